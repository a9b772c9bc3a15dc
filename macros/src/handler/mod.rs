//! `#[shard_handler]` in three stages, each testable on its own:
//!
//! 1. [`parse`] reads the attribute's arguments and the `impl` block and checks them, turning
//!    every mistake into a `syn::Error` at the offending span;
//! 2. what it returns is the [`model`]: plain data describing the handler type, its message
//!    methods (which message each takes, sync or async, its wire-enum variant) and its lifecycle
//!    hooks;
//! 3. [`generate`] writes the code from the model alone: the block as written (less the hooks),
//!    the `ShardHandler` impl, the wire enum with its dispatch, and one `Handles` impl per
//!    message.
//!
//! Only the first stage fails: the model holds no invalid handler, so generation cannot go wrong.
//! The runtime side (what `ShardHandler`, `Handles` and the wire enum do) lives in `clusterfunk`.

mod generate;
mod model;
mod parse;

use proc_macro2::TokenStream as TokenStream2;

/// Expands `#[shard_handler]` with arguments `args` on the item `input`.
pub(crate) fn expand(args: TokenStream2, input: TokenStream2) -> syn::Result<TokenStream2> {
    let handler = parse::parse(args, input)?;
    Ok(generate::generate(&handler))
}
