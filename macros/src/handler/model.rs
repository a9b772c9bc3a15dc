//! What a `#[shard_handler]` block describes, once checked: plain data that
//! [`parse`](super::parse) builds and [`generate`](super::generate) reads. It holds the user's
//! tokens (types, names, spans) but no logic: a value of these types is always a valid handler.

use proc_macro2::Span;
use syn::{Ident, ImplItemFn, ItemImpl, Type};

/// A checked `#[shard_handler]` block.
pub(crate) struct Handler {
    /// The `impl` block as written, less the lifecycle hooks (which move into the
    /// `ShardHandler` impl): the generated code repeats it unchanged, so the message methods
    /// stay callable as inherent methods.
    pub(crate) block: ItemImpl,
    /// The handler type, as written after `impl`.
    pub(crate) self_ty: Type,
    /// The name of the generated wire enum: the type's last path segment followed by `Message`.
    pub(crate) enum_name: Ident,
    /// The message methods, in the order written.
    pub(crate) messages: Vec<MessageMethod>,
    /// The lifecycle hooks, in the order written.
    pub(crate) hooks: Vec<Hook>,
}

/// One method that handles a message type.
pub(crate) struct MessageMethod {
    /// The method's name.
    pub(crate) name: Ident,
    /// The message type it takes (its third argument), as written.
    pub(crate) message: Type,
    /// The wire-enum variant that carries the message: the method's name in camel case.
    pub(crate) variant: Ident,
    /// Whether it is an `async fn` (its reply is awaited in a boxed future) or a plain `fn`
    /// (its reply is ready when it returns).
    pub(crate) is_async: bool,
    /// The first and last spans of the return type (of the name when there is none): where a
    /// return type that is not the message's reply type is reported.
    pub(crate) output: (Span, Span),
}

/// One lifecycle hook: a method that overrides a `ShardHandler` default.
pub(crate) struct Hook {
    /// Which hook it is.
    pub(crate) kind: HookKind,
    /// The method, made private (it moves into the `ShardHandler` impl, where items cannot be
    /// `pub`); its signature is left to the compiler to check against the trait. An `async`
    /// `on_activate` stays in the block as written instead, and the trait impl calls it.
    pub(crate) method: ImplItemFn,
}

/// The lifecycle hooks a handler may override, named after their methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HookKind {
    /// `on_activate`: this node starts serving the shard.
    Activate,
    /// `async fn on_activate`: the same, awaited before the shard takes messages.
    ActivateAsync,
    /// `durable`: the part of the handler's state kept in the node's shard store.
    Durable,
    /// `may_passivate`: whether an idle shard without durable state may drop its state.
    MayPassivate,
    /// `on_deactivate`: this node stops serving the shard (and may hand off a snapshot).
    Deactivate,
    /// `on_restore`: the new owner receives the previous owner's snapshot.
    Restore,
}

impl HookKind {
    /// The hook a method named `name` overrides, if any. A raw identifier (`r#on_activate`) is
    /// no hook: it is compared as written.
    pub(crate) fn from_method_name(name: &str) -> Option<HookKind> {
        match name {
            "on_activate" => Some(HookKind::Activate),
            "on_deactivate" => Some(HookKind::Deactivate),
            "on_restore" => Some(HookKind::Restore),
            "durable" => Some(HookKind::Durable),
            "may_passivate" => Some(HookKind::MayPassivate),
            _ => None,
        }
    }
}
