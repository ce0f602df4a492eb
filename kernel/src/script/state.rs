//! A script's `this` state, saved with checkpoints so that a resumed course
//! continues with the same server momentum, moments or counters.
//!
//! Plain values (unit, booleans, integers, floats, strings, arrays, maps) and
//! the fedtune types `ParamSet` and `Tensor` are saved; `this.hp` is not (it
//! comes from the config every call, so an edited config wins on resume).
//! Anything else (a function pointer, an `Update`) cannot be saved, and the
//! error names where it sits (`this.history[2]`).

use std::collections::BTreeMap;

use rhai::{Array, Dynamic, Map};
use serde::{Deserialize, Serialize};

use crate::params::{ParamSet, ParamTensor};

/// Why a script's state cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// `this` holds a value a checkpoint cannot keep.
    #[error("{at} holds a {type_name}, which a checkpoint cannot save (keep numbers, strings, arrays, maps, ParamSets and Tensors in `this`)")]
    Unsavable {
        /// Where in `this` (`this.history[2]`).
        at: String,
        /// The value's type.
        type_name: String,
    },
    /// `this` is not a map.
    #[error("`this` is a {0}, not a map")]
    NotAMap(String),
    /// The state cannot be encoded.
    #[error("encoding the script state: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The bytes are not a saved state.
    #[error("not a saved script state: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// A state saved by another version of the format.
    #[error("saved script state has version {found}, this build reads {VERSION}")]
    Version {
        /// The version found.
        found: u32,
    },
}

/// One saved value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Saved {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Array(Vec<Saved>),
    Map(BTreeMap<String, Saved>),
    Params(ParamSet),
    Tensor(ParamTensor),
}

/// The file format: a version, then the map.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    this: BTreeMap<String, Saved>,
}

const VERSION: u32 = 1;

fn save(v: &Dynamic, at: &str) -> Result<Saved, StateError> {
    if v.is_unit() {
        return Ok(Saved::Unit);
    }
    if let Ok(b) = v.as_bool() {
        return Ok(Saved::Bool(b));
    }
    if let Ok(i) = v.as_int() {
        return Ok(Saved::Int(i));
    }
    if let Ok(f) = v.as_float() {
        return Ok(Saved::Float(f));
    }
    if v.is_string() {
        return Ok(Saved::Str(v.clone().into_string().unwrap_or_default()));
    }
    if v.is_array() {
        let a = v.read_lock::<Array>().expect("checked to be an array");
        return a
            .iter()
            .enumerate()
            .map(|(i, x)| save(x, &format!("{at}[{i}]")))
            .collect::<Result<_, _>>()
            .map(Saved::Array);
    }
    if v.is_map() {
        let m = v.read_lock::<Map>().expect("checked to be a map");
        return save_map(&m, at, false).map(Saved::Map);
    }
    if let Some(p) = v.read_lock::<ParamSet>() {
        return Ok(Saved::Params(p.clone()));
    }
    if let Some(t) = v.read_lock::<ParamTensor>() {
        return Ok(Saved::Tensor(t.clone()));
    }
    Err(StateError::Unsavable {
        at: at.to_string(),
        type_name: v.type_name().to_string(),
    })
}

fn save_map(m: &Map, at: &str, skip_hp: bool) -> Result<BTreeMap<String, Saved>, StateError> {
    m.iter()
        .filter(|(k, _)| !(skip_hp && k.as_str() == "hp"))
        .map(|(k, v)| Ok((k.to_string(), save(v, &format!("{at}.{k}"))?)))
        .collect()
}

fn load(s: Saved) -> Dynamic {
    match s {
        Saved::Unit => Dynamic::UNIT,
        Saved::Bool(b) => Dynamic::from(b),
        Saved::Int(i) => Dynamic::from(i),
        Saved::Float(f) => Dynamic::from(f),
        Saved::Str(s) => Dynamic::from(s),
        Saved::Array(a) => Dynamic::from_array(a.into_iter().map(load).collect()),
        Saved::Map(m) => Dynamic::from_map(load_map(m)),
        Saved::Params(p) => Dynamic::from(p),
        Saved::Tensor(t) => Dynamic::from(t),
    }
}

fn load_map(m: BTreeMap<String, Saved>) -> Map {
    m.into_iter().map(|(k, v)| (k.into(), load(v))).collect()
}

/// `this` (a map; `this.hp` left out) as bytes for a checkpoint.
pub fn save_state(this: &Dynamic) -> Result<Vec<u8>, StateError> {
    let map = match this.read_lock::<Map>() {
        Some(m) => save_map(&m, "this", true)?,
        None if this.is_unit() => BTreeMap::new(),
        None => return Err(StateError::NotAMap(this.type_name().to_string())),
    };
    Ok(rmp_serde::to_vec(&Snapshot {
        version: VERSION,
        this: map,
    })?)
}

/// The `this` map saved by [`save_state`].
pub fn load_state(bytes: &[u8]) -> Result<Dynamic, StateError> {
    let snap: Snapshot = rmp_serde::from_slice(bytes)?;
    if snap.version != VERSION {
        return Err(StateError::Version {
            found: snap.version,
        });
    }
    Ok(Dynamic::from_map(load_map(snap.this)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(x: f32) -> ParamSet {
        let mut p = ParamSet::new();
        p.insert("a", vec![2], vec![x, -x]).unwrap();
        p
    }

    #[test]
    fn round_trips_every_saveable_value_and_drops_hp() {
        let mut inner = Map::new();
        inner.insert("m".into(), Dynamic::from(params(1.5)));
        inner.insert(
            "t".into(),
            Dynamic::from(params(2.0).get("a").unwrap().clone()),
        );
        let mut this = Map::new();
        this.insert("hp".into(), Dynamic::from_map(Map::new()));
        this.insert("round".into(), Dynamic::from(3_i64));
        this.insert("beta".into(), Dynamic::from(0.9_f64));
        this.insert("on".into(), Dynamic::from(true));
        this.insert("name".into(), Dynamic::from("x".to_string()));
        this.insert("nothing".into(), Dynamic::UNIT);
        this.insert(
            "list".into(),
            Dynamic::from_array(vec![Dynamic::from(1_i64), Dynamic::from_map(inner)]),
        );
        let bytes = save_state(&Dynamic::from_map(this)).unwrap();
        let back = load_state(&bytes).unwrap();
        let m = back.read_lock::<Map>().unwrap();
        assert!(!m.contains_key("hp"));
        assert_eq!(m["round"].as_int().unwrap(), 3);
        assert_eq!(m["beta"].as_float().unwrap(), 0.9);
        assert!(m["on"].as_bool().unwrap());
        assert_eq!(m["name"].clone().into_string().unwrap(), "x");
        assert!(m["nothing"].is_unit());
        let list = m["list"].read_lock::<Array>().unwrap();
        assert_eq!(list[0].as_int().unwrap(), 1);
        let inner = list[1].read_lock::<Map>().unwrap();
        assert_eq!(*inner["m"].read_lock::<ParamSet>().unwrap(), params(1.5));
        assert_eq!(
            inner["t"].read_lock::<ParamTensor>().unwrap().data(),
            &[2.0, -2.0]
        );
    }

    #[test]
    fn an_unsaveable_value_is_named_by_its_path() {
        let mut this = Map::new();
        this.insert(
            "history".into(),
            Dynamic::from_array(vec![
                Dynamic::from(1_i64),
                Dynamic::from(rhai::FnPtr::new("f").unwrap()),
            ]),
        );
        let e = save_state(&Dynamic::from_map(this))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("this.history[1] holds a Fn"), "{e}");
    }

    #[test]
    fn garbage_is_refused() {
        assert!(load_state(b"not msgpack at all")
            .unwrap_err()
            .to_string()
            .contains("not a saved script state"));
    }
}
