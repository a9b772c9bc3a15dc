//! Lifecycle hooks written in the `#[shard_handler]` block override the trait's defaults, and
//! `on_activate` runs before the shard's first message.
use std::sync::atomic::{AtomicUsize, Ordering};

use clusterfunk::prelude::*;

static DEACTIVATED: AtomicUsize = AtomicUsize::new(0);

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Option<String>)]
struct Greeting;

#[derive(Default)]
struct Greeter {
    greeting: Option<String>,
    restored: Option<String>,
}

#[shard_handler]
impl Greeter {
    fn on_activate(&mut self, ctx: &mut ShardContext) {
        self.greeting = Some(format!("hello from shard {}", ctx.shard()));
    }

    fn on_deactivate(&mut self, _ctx: &mut ShardContext) -> Option<Handoff> {
        DEACTIVATED.fetch_add(1, Ordering::SeqCst);
        Handoff::encode(&self.greeting).ok()
    }

    fn on_restore(&mut self, handoff: Handoff, _ctx: &mut ShardContext) {
        self.restored = handoff.decode().ok().flatten();
    }

    async fn greeting(
        &mut self,
        _key: Key,
        _msg: Greeting,
        _ctx: &mut ShardContext,
    ) -> Option<String> {
        // `restored` is only set after a planned move, which a standalone node never makes.
        self.restored.clone().or_else(|| self.greeting.clone())
    }
}

fn main() {
    // The hooks are the `ShardHandler` methods themselves: call `on_restore` directly.
    fn restore<H: ShardHandler>(handler: &mut H, handoff: Handoff, ctx: &mut ShardContext) {
        handler.on_restore(handoff, ctx);
    }
    let _ = restore::<Greeter>;

    actix::System::new().block_on(async {
        let node = Cluster::builder()
            .shards(4)
            .handler::<Greeter>()
            .standalone()
            .start()
            .await
            .unwrap();
        let shard = node.shard_for("k");
        // `greeting` is set by `on_activate`, which ran before this first message.
        assert_eq!(
            node.send("k", Greeting).await,
            Ok(Some(format!("hello from shard {shard}")))
        );
        assert_eq!(DEACTIVATED.load(Ordering::SeqCst), 0);
        node.shutdown().await;
        assert_eq!(DEACTIVATED.load(Ordering::SeqCst), 1);
        assert_eq!(node.send("k", Greeting).await, Err(Error::ShuttingDown));
    });
}
