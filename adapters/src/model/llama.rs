//! The Llama decoder's weights and its forward pass.
//!
//! Weights are stored as Hugging Face lays them out (`q_proj.weight` is
//! `(out, in)`, rotary embeddings rotate the two halves of each head), so
//! adapters trained here carry PEFT's names and shapes and load into PEFT.

use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{Family, LlamaConfig};
use crate::kernels::{
    attention, attention_fuses, frozen_linear, frozen_linear_add, lora_linear, rms_norm, rope,
    softmax_last_dim, swiglu, swiglu_linear_add, AttentionDims, Frozen, LowRank,
};
use crate::loss::{counted_positions, head_cross_entropy};

/// A score small enough that softmax gives it zero weight, yet finite, so a
/// row with every key masked yields a uniform distribution rather than NaN.
const MASKED: f64 = -1e9;

/// The linear projections of a decoder block, by their Hugging Face names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Projection {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl Projection {
    /// Every projection, in block order.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The module's short name (`q_proj`), as PEFT's `target_modules` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The module's path inside a block (`self_attn.q_proj`).
    pub fn path(self) -> &'static str {
        match self {
            Projection::Q => "self_attn.q_proj",
            Projection::K => "self_attn.k_proj",
            Projection::V => "self_attn.v_proj",
            Projection::O => "self_attn.o_proj",
            Projection::Gate => "mlp.gate_proj",
            Projection::Up => "mlp.up_proj",
            Projection::Down => "mlp.down_proj",
        }
    }

    /// Parses a short name such as `v_proj`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Parses a list of short names, each once, in order; an unknown one is
    /// an error at `key` naming it as a `what` and listing the known names.
    pub fn parse_all(
        names: &[String],
        key: &str,
        what: &str,
    ) -> std::result::Result<Vec<Self>, fedtune_kernel::KeyError> {
        let mut out = Vec::new();
        for name in names {
            let p = Self::from_name(name).ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|p| p.name()).collect();
                fedtune_kernel::KeyError::new(
                    key,
                    format!("unknown {what} `{name}` (known: {})", known.join(", ")),
                )
            })?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// This projection's place in [`Projection::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// `(in, out)` features of this projection in a model of `cfg`'s shape.
    pub fn dims(self, cfg: &LlamaConfig) -> (usize, usize) {
        let (h, q, kv, i) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        match self {
            Projection::Q => (h, q),
            Projection::O => (q, h),
            Projection::K | Projection::V => (h, kv),
            Projection::Gate | Projection::Up => (h, i),
            Projection::Down => (i, h),
        }
    }
}

/// The two RMSNorms of a decoder block, by their Hugging Face names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Norm {
    /// `input_layernorm`, before attention.
    Input,
    /// `post_attention_layernorm`, before the MLP.
    PostAttention,
}

impl Norm {
    /// Both, in block order.
    pub const ALL: [Norm; 2] = [Norm::Input, Norm::PostAttention];

    /// The module's path inside a block.
    pub fn path(self) -> &'static str {
        match self {
            Norm::Input => "input_layernorm",
            Norm::PostAttention => "post_attention_layernorm",
        }
    }
}

/// What an adapter adds to the forward pass: terms on projections (LoRA
/// adds `scale · x Aᵀ Bᵀ`), virtual tokens before the input (prompt tuning,
/// P-tuning), or keys and values before every layer's own (prefix-tuning).
///
/// Virtual tokens and prefixes take the first positions of a sequence: they
/// are added when a forward pass starts a sequence (no cache, or an empty
/// one), their outputs are dropped, and the real tokens' positions follow
/// them, as in PEFT.
pub trait ProjectionAdapter {
    /// The term added to projection `proj` of block `layer` for inputs `x`
    /// of shape `(tokens, in)`, as `(tokens, out)`; `None` leaves it alone.
    fn delta(&self, layer: usize, proj: Projection, x: &Tensor) -> Result<Option<Tensor>>;

    /// Whether [`ProjectionAdapter::delta`] (or `low_rank`) may give a term
    /// for this projection: `false` lets the model fuse the projection with
    /// the op before it. The default, `true`, is always safe.
    fn adapts(&self, _layer: usize, _proj: Projection) -> bool {
        true
    }

    /// The same term when it is low-rank, `scale · (x ⊙ mask) Aᵀ Bᵀ`, so the
    /// projection and the term run as one fused op; draws any dropout mask
    /// (call it instead of [`ProjectionAdapter::delta`], not as well).
    fn low_rank(&self, _layer: usize, _proj: Projection, _x: &Tensor) -> Result<Option<LowRank>> {
        Ok(None)
    }

    /// A frozen term `(out, in)` added to the weight of projection `proj`
    /// of block `layer` before it multiplies (a LoRA residual); `None`
    /// leaves the weight alone. Gradients flow to the input, not to it.
    fn weight_delta(&self, _layer: usize, _proj: Projection) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Embeddings `(n, hidden)` to put before every sequence's tokens.
    fn virtual_tokens(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// A term `(hidden)` added to the weight of norm `norm` of block
    /// `layer` (a norm trained in full); `None` leaves it alone.
    fn norm_delta(&self, _layer: usize, _norm: Norm) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// How many prefix positions [`ProjectionAdapter::kv_prefix`] gives every layer (0: none).
    fn prefix_len(&self) -> usize {
        0
    }

    /// Keys and values `(prefix_len, kv_heads · head_dim)` that block
    /// `layer`'s attention sees before the sequence's own (no rotary
    /// embedding is applied to them).
    fn kv_prefix(&self, _layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
}

/// The frozen weights of one decoder block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMSNorm weight before attention, `(hidden)`.
    pub input_layernorm: Tensor,
    /// `(hidden, hidden)`
    pub q_proj: Frozen,
    /// `(kv_heads · head_dim, hidden)`
    pub k_proj: Frozen,
    /// `(kv_heads · head_dim, hidden)`
    pub v_proj: Frozen,
    /// `(hidden, hidden)`
    pub o_proj: Frozen,
    /// RMSNorm weight before the MLP, `(hidden)`.
    pub post_attention_layernorm: Tensor,
    /// `(intermediate, hidden)`
    pub gate_proj: Frozen,
    /// `(intermediate, hidden)`
    pub up_proj: Frozen,
    /// `(hidden, intermediate)`
    pub down_proj: Frozen,
    /// Each projection's bias `(out)`, by [`Projection::index`], where the
    /// family has one ([`LlamaConfig::has_bias`]).
    pub biases: [Option<Tensor>; 7],
}

impl LayerWeights {
    /// Assembles a block from its two norm weights and a source of projection
    /// weights (called once per projection, in block order).
    pub fn from_parts<W: Into<Frozen>>(
        input_layernorm: Tensor,
        post_attention_layernorm: Tensor,
        mut projection: impl FnMut(Projection) -> Result<W>,
    ) -> Result<Self> {
        let mut projection = |p| projection(p).map(Into::into);
        Ok(Self {
            input_layernorm,
            q_proj: projection(Projection::Q)?,
            k_proj: projection(Projection::K)?,
            v_proj: projection(Projection::V)?,
            o_proj: projection(Projection::O)?,
            post_attention_layernorm,
            gate_proj: projection(Projection::Gate)?,
            up_proj: projection(Projection::Up)?,
            down_proj: projection(Projection::Down)?,
            biases: Default::default(),
        })
    }

    /// This block with each projection's weight `f(projection, weight)`,
    /// sharing its norms and biases.
    pub fn map_projections(
        &self,
        mut f: impl FnMut(Projection, &Frozen) -> Result<Frozen>,
    ) -> Result<Self> {
        Ok(Self {
            biases: self.biases.clone(),
            ..Self::from_parts(
                self.input_layernorm.clone(),
                self.post_attention_layernorm.clone(),
                |p| f(p, self.weight(p)),
            )?
        })
    }

    /// The bias of one projection, if it has one.
    pub fn bias(&self, p: Projection) -> Option<&Tensor> {
        self.biases[p.index()].as_ref()
    }

    /// The weight of one norm.
    pub fn norm(&self, n: Norm) -> &Tensor {
        match n {
            Norm::Input => &self.input_layernorm,
            Norm::PostAttention => &self.post_attention_layernorm,
        }
    }

    /// The weight of one projection.
    pub fn weight(&self, p: Projection) -> &Frozen {
        match p {
            Projection::Q => &self.q_proj,
            Projection::K => &self.k_proj,
            Projection::V => &self.v_proj,
            Projection::O => &self.o_proj,
            Projection::Gate => &self.gate_proj,
            Projection::Up => &self.up_proj,
            Projection::Down => &self.down_proj,
        }
    }
}

/// A Llama-family decoder with frozen weights.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<LayerWeights>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    /// Assembles a model, checking every weight's shape against `cfg`.
    /// `lm_head` is `None` when the output head is tied to the embeddings.
    pub fn new(
        cfg: LlamaConfig,
        embed_tokens: Tensor,
        layers: Vec<LayerWeights>,
        norm: Tensor,
        lm_head: Option<Tensor>,
    ) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let check = |name: &str, t: &[usize], dims: &[usize]| {
            if t != dims {
                candle_core::bail!("weight `{name}` has shape {t:?}, expected {dims:?}")
            }
            Ok(())
        };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        check("model.embed_tokens.weight", embed_tokens.dims(), &[v, h])?;
        check("model.norm.weight", norm.dims(), &[h])?;
        if let Some(head) = &lm_head {
            check("lm_head.weight", head.dims(), &[v, h])?;
        }
        if layers.len() != cfg.num_hidden_layers {
            candle_core::bail!(
                "{} layers given, config says {}",
                layers.len(),
                cfg.num_hidden_layers
            )
        }
        for (i, l) in layers.iter().enumerate() {
            check(
                &format!("model.layers.{i}.input_layernorm.weight"),
                l.input_layernorm.dims(),
                &[h],
            )?;
            check(
                &format!("model.layers.{i}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.dims(),
                &[h],
            )?;
            for p in Projection::ALL {
                let (din, dout) = p.dims(&cfg);
                let (rows, cols) = l.weight(p).dims()?;
                check(
                    &format!("model.layers.{i}.{}.weight", p.path()),
                    &[rows, cols],
                    &[dout, din],
                )?;
                let bias = format!("model.layers.{i}.{}.bias", p.path());
                match (l.bias(p), cfg.has_bias(p)) {
                    (Some(b), true) => check(&bias, b.dims(), &[dout])?,
                    (None, false) => {}
                    (Some(_), false) => {
                        candle_core::bail!("weight `{bias}` is given, the config has no such bias")
                    }
                    (None, true) => candle_core::bail!("weight `{bias}` is missing"),
                }
            }
        }
        // The norms keep the activations' dtype; the embeddings may be in
        // the compute dtype.
        let (cos, sin) = rope_tables(&cfg, norm.dtype(), norm.device())?;
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
        })
    }

    /// This model with its frozen projections, token embeddings and output
    /// head stored in `dtype` (bf16: half the memory, products on the bf16
    /// units where the CPU has them; [`crate::kernels::bf16`]); norms and
    /// every activation stay in the model's own dtype ([`Llama::dtype`]),
    /// and looked-up embeddings are widened to it. `U8` stores the
    /// projections as int8 blocks ([`crate::kernels::int8`]) and the
    /// embeddings and head in bf16. The weights are converted, not copied:
    /// converting back widens the rounded values. `dtype` equal to the
    /// compute dtype gives the model back.
    pub fn with_compute(&self, dtype: DType) -> Result<Self> {
        self.clone().into_compute(dtype)
    }

    /// [`Llama::with_compute`] of this model, converting one layer at a
    /// time and letting each layer's old weights go once converted (unless
    /// another model shares them), so memory never holds two whole copies.
    pub fn into_compute(mut self, dtype: DType) -> Result<Self> {
        if dtype == self.compute_dtype() {
            return Ok(self);
        }
        // Tied, the embeddings are the head: one table serves both. With
        // int8 projections (`U8`) the embeddings and head are bf16.
        let dense = if dtype == DType::U8 {
            DType::BF16
        } else {
            dtype
        };
        self.embed_tokens = self.embed_tokens.to_dtype(dense)?;
        self.lm_head = self.lm_head.map(|h| h.to_dtype(dense)).transpose()?;
        self.layers = std::mem::take(&mut self.layers)
            .into_iter()
            .map(|l| l.map_projections(|_, w| w.to_storage(dtype)))
            .collect::<Result<Vec<_>>>()?;
        Ok(self)
    }

    /// This model with every tensor on `device` (a clone sharing the
    /// tensors when it is there already).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        if self.device().same_device(device) {
            return Ok(self.clone());
        }
        let to = |t: &Tensor| t.to_device(device);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mut moved = l.map_projections(|_, w| w.to_device(device))?;
                moved.input_layernorm = to(&l.input_layernorm)?;
                moved.post_attention_layernorm = to(&l.post_attention_layernorm)?;
                for b in moved.biases.iter_mut() {
                    *b = b.as_ref().map(to).transpose()?;
                }
                Ok(moved)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            embed_tokens: to(&self.embed_tokens)?,
            layers,
            norm: to(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(to).transpose()?,
            cos: to(&self.cos)?,
            sin: to(&self.sin)?,
        })
    }

    /// The dtype the frozen projections are stored and multiplied in.
    pub fn compute_dtype(&self) -> DType {
        self.layers
            .first()
            .map_or_else(|| self.embed_tokens.dtype(), |l| l.q_proj.dtype())
    }

    /// A model of these layers only (by index, in the order given), sharing
    /// this one's tensors: offsite-tuning's emulator is built this way.
    pub fn with_layers(&self, keep: &[usize]) -> Result<Self> {
        if let Some(bad) = keep.iter().find(|&&i| i >= self.layers.len()) {
            candle_core::bail!("layer {bad} of a {}-layer model", self.layers.len())
        }
        let cfg = LlamaConfig {
            num_hidden_layers: keep.len(),
            ..self.cfg.clone()
        };
        Self::new(
            cfg,
            self.embed_tokens.clone(),
            keep.iter().map(|&i| self.layers[i].clone()).collect(),
            self.norm.clone(),
            self.lm_head.clone(),
        )
    }

    /// This model with `delta(layer, projection)` added to the projection
    /// weights where it gives one (merging an adapter into the model).
    pub fn with_deltas(
        &self,
        mut delta: impl FnMut(usize, Projection) -> Result<Option<Tensor>>,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            layers.push(l.map_projections(|p, w| {
                Ok(match delta(i, p)? {
                    // A merged weight keeps the model's own precision: a
                    // small delta rounded into bf16 would be lost.
                    Some(d) => {
                        Frozen::Dense((w.values(self.dtype())? + d.to_dtype(self.dtype())?)?)
                    }
                    None => w.clone(),
                })
            })?);
        }
        Self::new(
            self.cfg.clone(),
            self.embed_tokens.clone(),
            layers,
            self.norm.clone(),
            self.lm_head.clone(),
        )
    }

    /// What Hugging Face's files store of an RMSNorm weight is the weight
    /// less this: Gemma's norms multiply by `1 + w`, and the model keeps
    /// `1 + w` so that every family runs the same norm.
    fn norm_offset(cfg: &LlamaConfig) -> f64 {
        if cfg.family == Family::Gemma {
            1.0
        } else {
            0.0
        }
    }

    /// This model with `delta(layer, norm)` added to the norm weights where
    /// it gives one (merging norms trained in full into the model).
    pub fn with_norm_deltas(
        &self,
        mut delta: impl FnMut(usize, Norm) -> Result<Option<Tensor>>,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let mut norm = |n: Norm| -> Result<Tensor> {
                let w = l.norm(n);
                match delta(i, n)? {
                    Some(d) => w + d.to_dtype(w.dtype())?,
                    None => Ok(w.clone()),
                }
            };
            layers.push(LayerWeights {
                input_layernorm: norm(Norm::Input)?,
                post_attention_layernorm: norm(Norm::PostAttention)?,
                ..l.clone()
            });
        }
        Self::new(
            self.cfg.clone(),
            self.embed_tokens.clone(),
            layers,
            self.norm.clone(),
            self.lm_head.clone(),
        )
    }

    /// A model of shape `cfg` from tensors named as [`Llama::named_weights`]
    /// names them (Hugging Face's names); `take` removes one by name.
    pub fn from_named(
        cfg: LlamaConfig,
        mut take: impl FnMut(&str) -> Result<Tensor>,
    ) -> Result<Self> {
        let offset = Self::norm_offset(&cfg);
        let embed = take("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let input_norm = take(&format!("model.layers.{i}.input_layernorm.weight"))?;
            let input_norm = shift(input_norm, offset)?;
            let post_norm = take(&format!("model.layers.{i}.post_attention_layernorm.weight"))?;
            let post_norm = shift(post_norm, offset)?;
            let mut layer = LayerWeights::from_parts(input_norm, post_norm, |p| {
                take(&format!("model.layers.{i}.{}.weight", p.path()))
            })?;
            for p in Projection::ALL.into_iter().filter(|&p| cfg.has_bias(p)) {
                layer.biases[p.index()] =
                    Some(take(&format!("model.layers.{i}.{}.bias", p.path()))?);
            }
            layers.push(layer);
        }
        let norm = shift(take("model.norm.weight")?, offset)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight")?)
        };
        Self::new(cfg, embed, layers, norm, lm_head)
    }

    /// A model of `cfg`'s shape with seeded random weights (for tests and benchmarks).
    pub fn random(cfg: LlamaConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensor = |dims: &[usize], mean: f32, spread: f32| -> Result<Tensor> {
            let n: usize = dims.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| mean + spread * rng.random_range(-1.0f32..1.0))
                .collect();
            Tensor::from_vec(data, dims, device)?.to_dtype(dtype)
        };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = tensor(&[v, h], 0.0, 0.5)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            // Draw order (projections, then the two norms) fixes what a seed means.
            let mut projections = Projection::ALL
                .iter()
                .map(|p| {
                    let (din, dout) = p.dims(&cfg);
                    tensor(&[dout, din], 0.0, 1.0 / (din as f32).sqrt())
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter();
            let input_norm = tensor(&[h], 1.0, 0.1)?;
            let post_norm = tensor(&[h], 1.0, 0.1)?;
            let mut layer = LayerWeights::from_parts(input_norm, post_norm, |_| {
                Ok(projections.next().expect("one weight per projection"))
            })?;
            // Biases last, so a seed draws the same weights with or without them.
            for p in Projection::ALL.into_iter().filter(|&p| cfg.has_bias(p)) {
                layer.biases[p.index()] = Some(tensor(&[p.dims(&cfg).1], 0.0, 0.5)?);
            }
            layers.push(layer);
        }
        let norm = tensor(&[h], 1.0, 0.1)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(tensor(&[v, h], 0.0, 0.5)?)
        };
        Self::new(cfg, embed, layers, norm, lm_head)
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The dtype of the activations (and of the norms' weights).
    pub fn dtype(&self) -> DType {
        self.norm.dtype()
    }

    /// Where the weights live.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Every weight under its Hugging Face name (`lm_head.weight` only when
    /// untied), as Hugging Face stores it.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let offset = -Self::norm_offset(&self.cfg);
        let norm = |t: &Tensor| shift(t.clone(), offset).expect("a norm weight shifts");
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                self.embed_tokens.clone(),
            ),
            ("model.norm.weight".to_string(), norm(&self.norm)),
        ];
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.clone()));
        }
        for (i, l) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                norm(&l.input_layernorm),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                norm(&l.post_attention_layernorm),
            ));
            for p in Projection::ALL {
                let w = l.weight(p).tensor().expect("int8 blocks dequantize");
                out.push((format!("model.layers.{i}.{}.weight", p.path()), w));
                if let Some(b) = l.bias(p) {
                    out.push((format!("model.layers.{i}.{}.bias", p.path()), b.clone()));
                }
            }
        }
        out
    }

    /// The frozen weights of every decoder block, in order.
    pub fn layers(&self) -> &[LayerWeights] {
        &self.layers
    }

    /// The token embeddings `(vocab, hidden)`, in the compute dtype
    /// ([`Llama::compute_dtype`]).
    pub fn token_embeddings(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// The output head: `lm_head`, or the token embeddings when tied.
    pub fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Logits `(batch, seq, vocab)` for token ids `(batch, seq)`.
    ///
    /// `attention_mask` `(batch, seq)` holds 1 for real tokens and 0 for
    /// padding (right padding: padded keys are ignored; padded positions still
    /// produce logits, which the loss masks out).
    pub fn forward(
        &self,
        tokens: &Tensor,
        attention_mask: Option<&Tensor>,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let hidden = self.hidden_states(tokens, attention_mask, adapter)?;
        let logits = frozen_linear(&hidden, self.output_weight())?;
        logits.reshape((b, t, self.cfg.vocab_size))
    }

    /// The training loss: mean next-token cross-entropy over the positions whose
    /// label (shifted, −100 = ignored) counts. Only those positions go through
    /// the output head, and the head and the loss are one op over blocks of
    /// rows ([`head_cross_entropy`]: the logits of all positions never exist
    /// at once); the value equals [`crate::loss::causal_lm_loss`] of [`Llama::forward`].
    pub fn causal_lm_loss(
        &self,
        tokens: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Tensor> {
        if labels.dims() != tokens.dims() {
            candle_core::bail!(
                "labels have shape {:?}, tokens {:?}",
                labels.dims(),
                tokens.dims()
            )
        }
        let (rows, targets) = counted_positions(labels, self.cfg.vocab_size)?;
        let hidden = self.hidden_states(tokens, attention_mask, adapter)?;
        let n = rows.len();
        let kept = hidden.index_select(&Tensor::from_vec(rows, n, self.device())?, 0)?;
        head_cross_entropy(&kept, self.output_weight(), &targets)
    }

    /// The final-norm hidden states, flattened to `(batch · seq, hidden)`.
    pub fn hidden_states(
        &self,
        tokens: &Tensor,
        attention_mask: Option<&Tensor>,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Tensor> {
        Ok(self.run(tokens, attention_mask, None, adapter)?.0)
    }

    /// Logits `(batch, seq, vocab)` for `tokens` that continue the sequences in
    /// `cache` (positions start at `cache.len()`); the cache grows by `seq`.
    /// Sequences in a batch share one length (no padding).
    pub fn forward_cached(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let hidden = self.hidden_cached(tokens, cache, adapter)?;
        let logits = frozen_linear(&hidden, self.output_weight())?;
        logits.reshape((b, t, self.cfg.vocab_size))
    }

    /// Final-norm hidden states `(batch · seq, hidden)` of `tokens` after
    /// `cache`, which grows by `seq`.
    fn hidden_cached(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Tensor> {
        let t = tokens.dim(1)?;
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let (hidden, added) = self.run(tokens, None, Some(cache), adapter)?;
        debug_assert!(added >= t);
        cache.len += added;
        Ok(hidden)
    }

    /// As [`Llama::forward_cached`], but only the logits `(batch, vocab)` of
    /// each sequence's last position: what generation needs, without the
    /// output head's cost for every prompt token.
    pub fn forward_cached_last(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let hidden = self.hidden_cached(tokens, cache, adapter)?;
        let last = hidden
            .reshape((b, t, self.cfg.hidden_size))?
            .narrow(1, t - 1, 1)?
            .squeeze(1)?;
        frozen_linear(&last, self.output_weight())
    }

    /// The final-norm hidden states `(batch · seq, hidden)` of `tokens`, and
    /// how many positions the pass added to `cache` (the tokens, plus any
    /// virtual tokens and prefix an adapter puts before a sequence's start).
    fn run(
        &self,
        tokens: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<(Tensor, usize)> {
        let (b, t) = tokens.dims2()?;
        // Batches are collated on the CPU; they follow the weights.
        let tokens = &tokens.to_device(self.device())?;
        let attention_mask = attention_mask
            .map(|m| m.to_device(self.device()))
            .transpose()?;
        let attention_mask = attention_mask.as_ref();
        let offset = cache.as_ref().map_or(0, |c| c.len);
        // Virtual tokens and prefixes belong to a sequence's start only.
        let starts = offset == 0;
        let virt = match adapter {
            Some(a) if starts => a.virtual_tokens()?,
            _ => None,
        };
        let nv = virt.as_ref().map_or(Ok(0), |v| v.dim(0))?;
        let np = match adapter {
            Some(a) if starts => a.prefix_len(),
            _ => 0,
        };
        let tt = nv + t;
        let pos0 = offset + np;
        if pos0 + tt > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's {}",
                pos0 + tt,
                self.cfg.max_position_embeddings
            )
        }
        let mut h = self.embed_tokens.index_select(&tokens.flatten_all()?, 0)?; // (b·t, hidden)
        if h.dtype() != self.dtype() {
            h = h.to_dtype(self.dtype())?;
        }
        let mut mask_ext = attention_mask.cloned();
        if let Some(v) = &virt {
            let hidden = self.cfg.hidden_size;
            let v = v
                .to_dtype(h.dtype())?
                .unsqueeze(0)?
                .broadcast_as((b, nv, hidden))?
                .contiguous()?;
            h = Tensor::cat(&[&v, &h.reshape((b, t, hidden))?], 1)?.reshape((b * tt, hidden))?;
            if let Some(m) = &attention_mask {
                let ones = Tensor::ones((b, nv), m.dtype(), m.device())?;
                mask_ext = Some(Tensor::cat(&[&ones, m], 1)?);
            }
        }
        if self.cfg.family == Family::Gemma {
            // Gemma scales its input embeddings (virtual tokens' too, as
            // PEFT passes them in with the rest).
            h = (h * (self.cfg.hidden_size as f64).sqrt())?;
        }
        let mask = self.attention_bias(b, tt, pos0, mask_ext.as_ref())?;
        for (i, layer) in self.layers.iter().enumerate() {
            let x = self.block_norm(i, Norm::Input, layer, &h, adapter)?;
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            let prefix = match adapter {
                Some(a) if np > 0 => a.kv_prefix(i)?,
                _ => None,
            };
            let y = self.attention(i, layer, &x, (b, tt, pos0), &mask, slot, prefix, adapter)?;
            h = self.project_add(i, Projection::O, layer, &y, &h, adapter)?;
            let x = self.block_norm(i, Norm::PostAttention, layer, &h, adapter)?;
            h = self.mlp_add(i, layer, &x, &h, adapter)?;
        }
        let mut out = rms_norm(&h, &self.norm, self.cfg.rms_norm_eps)?;
        if nv > 0 {
            // The virtual tokens' outputs are not the caller's.
            let hidden = self.cfg.hidden_size;
            out = out
                .reshape((b, tt, hidden))?
                .narrow(1, nv, t)?
                .reshape((b * t, hidden))?;
        }
        Ok((out, np + tt))
    }

    /// RMSNorm `norm` of block `layer`; when the adapter trains its weight,
    /// the fused norm runs with unit weight and the weight multiplies after,
    /// so that the weight's term gets a gradient too.
    fn block_norm(
        &self,
        layer: usize,
        norm: Norm,
        weights: &LayerWeights,
        h: &Tensor,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Tensor> {
        let w = weights.norm(norm);
        let delta = match adapter {
            Some(a) => a.norm_delta(layer, norm)?,
            None => None,
        };
        match delta {
            None => rms_norm(h, w, self.cfg.rms_norm_eps),
            Some(d) => {
                let ones = Tensor::ones(w.dims(), w.dtype(), w.device())?;
                rms_norm(h, &ones, self.cfg.rms_norm_eps)?.broadcast_mul(&(w + d)?)
            }
        }
    }

    /// `h` plus the MLP of block `layer` for its normed input `x`.
    fn mlp_add(
        &self,
        layer: usize,
        weights: &LayerWeights,
        x: &Tensor,
        h: &Tensor,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Tensor> {
        let gate = self.project(layer, Projection::Gate, weights, x, adapter)?;
        let up = self.project(layer, Projection::Up, weights, x, adapter)?;
        let act = match self.cfg.family {
            // GELU (tanh approximation) gates Gemma's MLP: composite
            // ops, whose gradients candle provides.
            Family::Gemma => (gate.gelu()? * up)?,
            // A plain down projection runs with the gating and the
            // residual as one op, which keeps neither the `(tokens,
            // intermediate)` product nor the projection for backward.
            _ if self.plain(layer, Projection::Down, weights, adapter) => {
                let w = self.weight(layer, Projection::Down, weights, adapter)?;
                return swiglu_linear_add(&gate, &up, w, h);
            }
            _ => swiglu(&gate, &up)?,
        };
        self.project_add(layer, Projection::Down, weights, &act, h, adapter)
    }

    /// `h` plus projection `p` of `x`: one op when the projection is plain.
    fn project_add(
        &self,
        layer: usize,
        p: Projection,
        weights: &LayerWeights,
        x: &Tensor,
        h: &Tensor,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Tensor> {
        if self.plain(layer, p, weights, adapter) {
            let w = self.weight(layer, p, weights, adapter)?;
            return frozen_linear_add(x, w, h);
        }
        h + self.project(layer, p, weights, x, adapter)?
    }

    /// Whether projection `p` of block `layer` is its (frozen) weight alone:
    /// no bias, no adapter term.
    fn plain(
        &self,
        layer: usize,
        p: Projection,
        weights: &LayerWeights,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> bool {
        weights.bias(p).is_none() && adapter.is_none_or(|a| !a.adapts(layer, p))
    }

    /// Projection `p`'s weight, with the adapter's frozen weight term (a
    /// LoRA residual) added when it has one.
    fn weight(
        &self,
        layer: usize,
        p: Projection,
        weights: &LayerWeights,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Frozen> {
        match adapter
            .map(|a| a.weight_delta(layer, p))
            .transpose()?
            .flatten()
        {
            // In the delta's dtype: a bf16 or int8 weight is widened first.
            Some(d) => Ok(Frozen::Dense((weights.weight(p).values(d.dtype())? + d)?)),
            None => Ok(weights.weight(p).clone()),
        }
    }

    fn project(
        &self,
        layer: usize,
        p: Projection,
        weights: &LayerWeights,
        x: &Tensor,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Tensor> {
        let w = &self.weight(layer, p, weights, adapter)?;
        let y = match adapter {
            None => frozen_linear(x, w)?,
            Some(a) => match a.low_rank(layer, p, x)? {
                Some(term) => lora_linear(x, w, &term)?,
                None => match a.delta(layer, p, x)? {
                    Some(d) => (frozen_linear(x, w)? + d)?,
                    None => frozen_linear(x, w)?,
                },
            },
        };
        match weights.bias(p) {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The attention of block `i` for its normed input `x`, before the
    /// output projection: `(b·t, heads · head_dim)`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        i: usize,
        layer: &LayerWeights,
        x: &Tensor,
        (b, t, offset): (usize, usize, usize),
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        prefix: Option<(Tensor, Tensor)>,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim(),
        );
        let q = self.project(i, Projection::Q, layer, x, adapter)?;
        let k = self.project(i, Projection::K, layer, x, adapter)?;
        let v = self.project(i, Projection::V, layer, x, adapter)?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        if cache.is_none() && prefix.is_none() && attention_fuses(&q) {
            let dims = AttentionDims {
                batch: b,
                seq: t,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
            };
            return attention(&q, &k, &v, &cos, &sin, mask, dims);
        }
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            // (b·t, n·hd) → (b, n, t, hd)
            y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        let q = rope(&q, &cos, &sin)?;
        let k = rope(&k, &cos, &sin)?;
        // A prefix comes before the sequence's own keys and values, unrotated.
        let (k, v, at) = match prefix {
            None => (k, v, offset),
            Some((pk, pv)) => {
                let np = pk.dim(0)?;
                let expand = |p: Tensor| -> Result<Tensor> {
                    p.to_dtype(k.dtype())?
                        .reshape((np, nkv, hd))?
                        .transpose(0, 1)?
                        .unsqueeze(0)?
                        .broadcast_as((b, nkv, np, hd))?
                        .contiguous()
                };
                let k = Tensor::cat(&[&expand(pk)?, &k], 2)?;
                let v = Tensor::cat(&[&expand(pv)?, &v], 2)?;
                (k, v, offset - np)
            }
        };
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => append_kv(slot, &k, &v, at)?,
        };
        // Grouped-query attention without copying keys and values: the query
        // heads that share a kv head are stacked along the sequence axis,
        // (b, nh, t, hd) → (b, nkv, groups·t, hd), since head h uses kv head h / groups.
        let groups = self.cfg.gqa_groups();
        let q = q.reshape((b, nkv, groups * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?; // (b, nkv, groups·t, offset + t)
        let scores = scores.broadcast_add(mask)?;
        let probs = softmax_last_dim(&scores)?;
        let y = probs.matmul(&v)?; // (b, nkv, groups·t, hd)
        y.reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, nh * hd))
    }

    /// Additive attention bias `(b, 1, groups·t, offset + t)`: causal over
    /// absolute positions (within the sliding window, when the model has
    /// one), plus padded keys.
    fn attention_bias(
        &self,
        b: usize,
        t: usize,
        offset: usize,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let groups = self.cfg.gqa_groups();
        let keys = offset + t;
        let window = self.cfg.sliding_window.unwrap_or(usize::MAX);
        let causal: Vec<f32> = (0..groups * t)
            .flat_map(|row| {
                let i = offset + row % t;
                (0..keys).map(move |j| {
                    if j <= i && i - j < window {
                        0.0
                    } else {
                        MASKED as f32
                    }
                })
            })
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, groups * t, keys), self.device())?
            .to_dtype(self.dtype())?;
        match attention_mask {
            None => Ok(causal),
            Some(m) => {
                if m.dims() != [b, t] {
                    candle_core::bail!(
                        "attention mask has shape {:?}, expected [{b}, {t}]",
                        m.dims()
                    )
                }
                // The mask covers this pass's keys; earlier ones (a cache, a prefix) stay visible.
                let mut keep = m.to_dtype(self.dtype())?;
                if offset > 0 {
                    let earlier = Tensor::ones((b, offset), keep.dtype(), keep.device())?;
                    keep = Tensor::cat(&[&earlier, &keep], 1)?;
                }
                let keep = keep.reshape((b, 1, 1, keys))?;
                let pad = ((1.0 - keep)? * MASKED)?;
                causal.broadcast_add(&pad)
            }
        }
    }
}

/// Writes the keys and values `(b, kv_heads, t, head_dim)` of positions
/// `offset..offset + t` into a layer's cache buffers, growing them when full,
/// and returns views of positions `0..offset + t`.
///
/// The buffers are preallocated along the sequence axis and written in place,
/// so a decoding step copies only its own token's keys and values, where
/// concatenation would copy the whole cache at every step.
fn append_kv(
    slot: &mut Option<(Tensor, Tensor)>,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
) -> Result<(Tensor, Tensor)> {
    let need = offset + k.dim(2)?;
    let capacity = match slot {
        Some((bk, _)) => bk.dim(2)?,
        None => 0,
    };
    if need > capacity {
        let grown = need.max(capacity * 2).max(need + KV_HEADROOM);
        let old = slot.take();
        let buffer = |new: &Tensor, old: Option<&Tensor>| -> Result<Tensor> {
            let (b, h, _, d) = new.dims4()?;
            let buf = Tensor::zeros((b, h, grown, d), new.dtype(), new.device())?;
            if let Some(old) = old.filter(|_| offset > 0) {
                buf.slice_set(&old.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
            }
            Ok(buf)
        };
        *slot = Some((
            buffer(k, old.as_ref().map(|o| &o.0))?,
            buffer(v, old.as_ref().map(|o| &o.1))?,
        ));
    }
    let Some((bk, bv)) = slot.as_ref() else {
        unreachable!("the slot was filled above")
    };
    bk.slice_set(&k.contiguous()?, 2, offset)?;
    bv.slice_set(&v.contiguous()?, 2, offset)?;
    Ok((bk.narrow(2, 0, need)?, bv.narrow(2, 0, need)?))
}

/// `t + by`, or `t` itself when `by` is zero.
fn shift(t: Tensor, by: f64) -> Result<Tensor> {
    if by == 0.0 {
        Ok(t)
    } else {
        t + by
    }
}

/// Positions a cache buffer has room for beyond what it was first asked to hold.
const KV_HEADROOM: usize = 256;

/// Keys and values of the positions processed so far, per layer.
///
/// Each layer keeps preallocated buffers `(batch, kv_heads, capacity,
/// head_dim)` written in place; `clone` copies them, so a clone never sees
/// another's later positions.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        self.map_rows(Tensor::copy)
            .expect("copying a KV cache of tensors already in memory")
    }
}

impl KvCache {
    /// An empty cache for a model of `layers` blocks.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layer `layer`'s cached keys and values `(batch, kv_heads, len, head_dim)`
    /// (keys with their rotary embedding applied).
    pub fn layer(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        match self.layers.get(layer) {
            Some(Some((k, v))) => Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?))),
            _ => Ok(None),
        }
    }

    /// This cache of one sequence, repeated for a batch of `batch` sequences
    /// that continue it (a shared few-shot prefix).
    pub fn expand(&self, batch: usize) -> Result<Self> {
        let len = self.len;
        self.map_rows(|t| {
            let (one, h, cap, d) = t.dims4()?;
            if one != 1 {
                candle_core::bail!("only a cache of one sequence expands, this one has {one}")
            }
            let buf = Tensor::zeros((batch, h, cap, d), t.dtype(), t.device())?;
            if len > 0 {
                let rows = t.narrow(2, 0, len)?.broadcast_as((batch, h, len, d))?;
                buf.slice_set(&rows.contiguous()?, 2, 0)?;
            }
            Ok(buf)
        })
    }

    /// Keeps the sequences at `rows` (in that order), dropping the others.
    pub fn select(&self, rows: &[u32]) -> Result<Self> {
        let Some(device) = self.layers.iter().flatten().map(|(k, _)| k.device()).next() else {
            return Ok(self.clone());
        };
        let idx = Tensor::new(rows, device)?;
        self.map_rows(|t| t.index_select(&idx, 0))
    }

    fn map_rows(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|slot| match slot {
                Some((k, v)) => Ok(Some((f(k)?, f(v)?))),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: self.len,
        })
    }
}

/// Cosine and sine tables `(max_positions, head_dim / 2)` of the rotary
/// embedding (with Llama 3's frequency scaling when the config has it).
fn rope_tables(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let theta = f64::from(cfg.rope_theta);
    let inv_freq: Vec<f64> = (0..hd / 2)
        .map(|i| {
            let f = 1.0 / theta.powf(2.0 * i as f64 / hd as f64);
            cfg.rope_scaling.as_ref().map_or(f, |s| s.scale(f))
        })
        .collect();
    let n = cfg.max_position_embeddings;
    let angles: Vec<f64> = (0..n)
        .flat_map(|p| inv_freq.iter().map(move |f| p as f64 * f))
        .collect();
    let cos: Vec<f64> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f64> = angles.iter().map(|a| a.sin()).collect();
    let cos = Tensor::from_vec(cos, (n, hd / 2), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (n, hd / 2), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}
