//! Less common but valid handlers: a handler with no methods, a raw-identifier method name,
//! `pub` methods and hooks, `mut` arguments, attributes and doc comments on methods.
use clusterfunk::prelude::*;

/// A handler without messages: only hooks (or nothing at all).
#[derive(Default)]
struct Idle;

#[shard_handler]
impl Idle {
    pub fn on_activate(&mut self, _ctx: &mut ShardContext) {}
}

#[derive(Default)]
struct Nothing;

#[shard_handler]
impl Nothing {}

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(String)]
pub struct Kind {
    pub name: String,
}

#[derive(Default)]
pub struct Kinds;

#[shard_handler]
impl Kinds {
    /// Documented, attributed, `pub`, with a raw identifier as its name.
    #[inline]
    #[allow(clippy::needless_pass_by_value)]
    pub fn r#type(&mut self, key: Key, mut msg: Kind, ctx: &mut ShardContext) -> String {
        msg.name.push('!');
        format!("{key}/{}/{}", msg.name, ctx.key())
    }
}

fn main() {
    assert!(<IdleMessage as clusterfunk::__private::WireMessage<Idle>>::TAGS.is_empty());
    assert!(<NothingMessage as clusterfunk::__private::WireMessage<Nothing>>::TAGS.is_empty());
    let _ = KindsMessage::Type(Kind {
        name: String::new(),
    });
    actix::System::new().block_on(async {
        let idle = Cluster::builder()
            .shards(2)
            .handler::<Idle>()
            .standalone()
            .start()
            .await
            .unwrap();
        let unknown = Error::UnknownMessage {
            tag: "Kind".to_string(),
        };
        assert_eq!(
            idle.handle().send("k", Kind { name: "x".into() }).await,
            Err(unknown)
        );
        idle.shutdown().await;

        let kinds = Cluster::builder()
            .shards(2)
            .handler::<Kinds>()
            .standalone()
            .start()
            .await
            .unwrap();
        assert_eq!(
            kinds.send("k", Kind { name: "x".into() }).await.as_deref(),
            Ok("k/x!/k")
        );
        kinds.shutdown().await;
    });
}
