//! The NATS subject hierarchy of a course, and its inverse.

use fedtune_kernel::Party;
use thiserror::Error;

/// Why a subject cannot be built.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SubjectError {
    /// The course name is not a single NATS subject token.
    #[error("course name `{0}` cannot be a NATS subject token (use letters, digits, `-`, `_`)")]
    BadCourse(String),
    /// Clients talk only to the server and the server only to clients.
    #[error("no route from {from} to {to}")]
    NoRoute { from: Party, to: Party },
}

/// The root of every fedtune subject.
pub const ROOT: &str = "fedtune";

/// Where a message goes, as a NATS subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A client's message to the server; the id is the sender.
    ToServerFrom(u32),
    /// The server's message to one client.
    ToClient(u32),
    /// The server's broadcast to all clients.
    Broadcast,
}

/// Builds subjects for one course; the course name must be a valid subject token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    course: String,
}

impl Subjects {
    /// Subjects of `course`; fails if the name cannot be a single subject token.
    pub fn new(course: &str) -> Result<Self, SubjectError> {
        if course.is_empty()
            || !course
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(SubjectError::BadCourse(course.to_string()));
        }
        Ok(Self {
            course: course.to_string(),
        })
    }

    /// The subject of a route.
    pub fn subject(&self, route: Route) -> String {
        match route {
            Route::ToServerFrom(id) => format!("{ROOT}.{}.server.{id}", self.course),
            Route::ToClient(id) => format!("{ROOT}.{}.client.{id}", self.course),
            Route::Broadcast => format!("{ROOT}.{}.all", self.course),
        }
    }

    /// The route a message from `from` to `to` takes.
    pub fn route(from: Party, to: Party) -> Result<Route, SubjectError> {
        match (from, to) {
            (Party::Client(id), Party::Server) => Ok(Route::ToServerFrom(id)),
            (Party::Server, Party::Client(id)) => Ok(Route::ToClient(id)),
            _ => Err(SubjectError::NoRoute { from, to }),
        }
    }

    /// `me`'s own echo subject: a party publishes a token there and waits
    /// for it to come back, the one round trip that proves the broker has
    /// registered the party's earlier subscriptions (no other party may
    /// publish or subscribe there).
    pub fn probe(&self, me: Party) -> String {
        let prefix = self.probe_prefix();
        match me {
            Party::Server => format!("{prefix}server"),
            Party::Client(id) => format!("{prefix}{id}"),
        }
    }

    /// The prefix of every probe subject of this course.
    pub fn probe_prefix(&self) -> String {
        format!("{ROOT}.{}.probe.", self.course)
    }

    /// What the server subscribes to: every client's messages to it.
    pub fn server_inbox(&self) -> String {
        format!("{ROOT}.{}.server.*", self.course)
    }

    /// The sender of a message that arrived on `subject`, or `None` if the
    /// subject is not one of this course's.
    pub fn sender_of(&self, subject: &str) -> Option<Party> {
        let rest = subject.strip_prefix(ROOT)?.strip_prefix('.')?;
        let rest = rest.strip_prefix(self.course.as_str())?.strip_prefix('.')?;
        match rest.split_once('.') {
            Some(("server", id)) => parse_id(id).map(Party::Client),
            Some(("client", id)) => parse_id(id).map(|_| Party::Server),
            None if rest == "all" => Some(Party::Server),
            _ => None,
        }
    }
}

/// Client ids are canonical decimal numbers: `007` or `+7` would be a second
/// subject for the same client, so they are refused.
fn parse_id(token: &str) -> Option<u32> {
    let id: u32 = token.parse().ok()?;
    (id.to_string() == token).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_documented_hierarchy() {
        let s = Subjects::new("fed-gsm8k-3").unwrap();
        assert_eq!(
            s.subject(Route::ToServerFrom(2)),
            "fedtune.fed-gsm8k-3.server.2"
        );
        assert_eq!(
            s.subject(Route::ToClient(3)),
            "fedtune.fed-gsm8k-3.client.3"
        );
        assert_eq!(s.subject(Route::Broadcast), "fedtune.fed-gsm8k-3.all");
        assert_eq!(s.server_inbox(), "fedtune.fed-gsm8k-3.server.*");
    }

    #[test]
    fn the_sender_comes_from_the_subject() {
        let s = Subjects::new("c").unwrap();
        for route in [Route::ToServerFrom(5), Route::ToClient(5), Route::Broadcast] {
            let expected = match route {
                Route::ToServerFrom(id) => Party::Client(id),
                _ => Party::Server,
            };
            assert_eq!(s.sender_of(&s.subject(route)), Some(expected));
        }
        for bad in [
            "fedtune.c.server.05",
            "fedtune.c.server.+5",
            "fedtune.c.server.x",
            "fedtune.d.server.5",
            "fedtune.c.server",
            "other.c.all",
            "fedtune.c.all.x",
        ] {
            assert_eq!(s.sender_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn routes_and_course_names_are_checked() {
        assert_eq!(
            Subjects::route(Party::Client(1), Party::Server),
            Ok(Route::ToServerFrom(1))
        );
        assert!(Subjects::route(Party::Client(1), Party::Client(2)).is_err());
        assert!(Subjects::new("a.b").is_err());
        assert!(Subjects::new("a*").is_err());
        assert!(Subjects::new("").is_err());
    }
}
