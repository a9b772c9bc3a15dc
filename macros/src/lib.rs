//! Procedural macros of clusterfunk: `#[derive(ShardMessage)]` and `#[shard_handler]`.
//!
//! Use them through the `clusterfunk` crate (`use clusterfunk::prelude::*;`), which re-exports
//! them; the code they generate names `::clusterfunk`. Every entry point goes through one
//! `expand` function that turns a `syn::Error` into a `compile_error!` at the offending span.
//! This crate holds no runtime logic: dispatch, actors and routing live in `clusterfunk`.
//!
//! Spans: on stable Rust a `Span` cannot be joined, so errors are built with
//! `syn::Error::new_spanned` (which underlines from the first to the last token of the offending
//! code), and generated code whose type errors the compiler reports (a wrong return type, a
//! message type that is not a `ShardMessage`) carries the spans of the user's tokens.
//!
//! Layout: this file holds the entry points, `#[derive(ShardMessage)]` and the span helpers;
//! `handler` holds `#[shard_handler]` in three stages (parse and check, model, generate).

mod handler;

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2, TokenTree};
use quote::{quote, ToTokens};
use syn::ext::IdentExt;
use syn::{Data, DeriveInput, Expr, ExprLit, Lit, Meta, Type};

/// Derives `clusterfunk::ShardMessage` for a message type.
///
/// `#[reply(T)]` names the reply type (required); `#[tag = "name"]` pins the wire tag (default:
/// the type's name); `#[idempotent]` declares that handling the message twice has the same
/// effect as handling it once, so it may be re-sent after a failover (default: not
/// idempotent). The type must also derive serde's `Serialize` and `Deserialize`.
#[proc_macro_derive(ShardMessage, attributes(reply, tag, idempotent))]
pub fn derive_shard_message(input: TokenStream) -> TokenStream {
    let derived = syn::parse::<DeriveInput>(input).and_then(derive_message);
    expand(derived, TokenStream2::new())
}

/// Implements `clusterfunk::ShardHandler` for the type of an `impl` block of handler methods.
///
/// Every method takes `(&mut self, key: Key, msg: M, ctx: &mut ShardContext)` and returns
/// `M`'s reply type, as a plain `fn` or an `async fn`; one method per message type. Methods named
/// `on_activate` (which may be an `async fn`), `on_deactivate` and `on_restore` override the
/// lifecycle hooks; `durable` declares the handler's durable state and `may_passivate` lets an
/// idle shard without durable state drop its state. Generates the wire enum `<Type>Message`
/// with one variant per message and the dispatch.
#[proc_macro_attribute]
pub fn shard_handler(args: TokenStream, input: TokenStream) -> TokenStream {
    let original = TokenStream2::from(input.clone());
    expand(handler::expand(args.into(), input.into()), original)
}

/// The one exit of every macro: the expansion, or the error as a `compile_error!` at its span
/// followed by `on_error` (the item as written, so one mistake does not cascade into errors
/// wherever the item is used).
fn expand(result: syn::Result<TokenStream2>, on_error: TokenStream2) -> TokenStream {
    match result {
        Ok(tokens) => tokens.into(),
        Err(error) => {
            let mut tokens = error.into_compile_error();
            tokens.extend(on_error);
            tokens.into()
        }
    }
}

fn derive_message(input: DeriveInput) -> syn::Result<TokenStream2> {
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &input.generics,
            "a ShardMessage cannot be generic: each message type needs one stable wire tag",
        ));
    }
    if let Data::Union(u) = &input.data {
        return Err(syn::Error::new(
            u.union_token.span,
            "a ShardMessage must be a struct or an enum",
        ));
    }
    let mut reply: Option<Type> = None;
    let mut tag: Option<String> = None;
    let mut idempotent = false;
    for attr in &input.attrs {
        if attr.path().is_ident("idempotent") {
            if !matches!(attr.meta, Meta::Path(_)) {
                return Err(syn::Error::new_spanned(
                    attr,
                    "#[idempotent] takes no arguments; leave it out for a message that is not idempotent",
                ));
            }
            if idempotent {
                return Err(syn::Error::new_spanned(attr, "duplicate #[idempotent]"));
            }
            idempotent = true;
            continue;
        }
        if attr.path().is_ident("reply") {
            if reply.is_some() {
                return Err(syn::Error::new_spanned(
                    attr,
                    "duplicate #[reply(..)]: a message has one reply type",
                ));
            }
            let Meta::List(list) = &attr.meta else {
                return Err(syn::Error::new_spanned(
                    attr,
                    "expected a reply type in parentheses, as in #[reply(u64)] or #[reply(())]",
                ));
            };
            let ty: Type = syn::parse2(list.tokens.clone()).map_err(|_| {
                syn::Error::new_spanned(
                    &list.tokens,
                    "expected a reply type, as in #[reply(u64)] or #[reply(())]",
                )
            })?;
            reply = Some(ty);
        } else if attr.path().is_ident("tag") {
            if tag.is_some() {
                return Err(syn::Error::new_spanned(
                    attr,
                    "duplicate #[tag = \"..\"]: a message has one wire tag",
                ));
            }
            let Meta::NameValue(nv) = &attr.meta else {
                return Err(syn::Error::new_spanned(attr, "expected #[tag = \"name\"]"));
            };
            let Expr::Lit(ExprLit {
                lit: Lit::Str(s), ..
            }) = &nv.value
            else {
                return Err(syn::Error::new_spanned(
                    &nv.value,
                    "the tag must be a string literal: #[tag = \"name\"]",
                ));
            };
            if s.value().is_empty() {
                return Err(syn::Error::new(s.span(), "the tag must not be empty"));
            }
            tag = Some(s.value());
        }
    }
    let name = &input.ident;
    let Some(reply) = reply else {
        return Err(syn::Error::new(
            name.span(),
            format!(
                "`{name}` needs #[reply(T)] naming the type its handler returns, e.g. #[reply(u64)]"
            ),
        ));
    };
    let tag = tag.unwrap_or_else(|| name.unraw().to_string());
    Ok(quote! {
        impl ::clusterfunk::ShardMessage for #name {
            type Reply = #reply;
            const TAG: &'static str = #tag;
            const IDEMPOTENT: bool = #idempotent;
        }
    })
}

/// The spans of the first and the last token of `tokens`.
fn span_range(tokens: &impl ToTokens) -> (Span, Span) {
    let mut iter = tokens.to_token_stream().into_iter();
    let first = iter.next().map_or_else(Span::call_site, |t| t.span());
    let last = iter.last().map_or(first, |t| t.span());
    (first, last)
}

/// `tokens` with the top-level spans set so that the code they form covers `first..last`: the
/// compiler reports an error in them from the start of `first` to the end of `last` (spans
/// cannot be joined on stable Rust, but the compiler joins those of adjacent tokens).
fn respan(tokens: TokenStream2, (first, last): (Span, Span)) -> TokenStream2 {
    let trees: Vec<TokenTree> = tokens.into_iter().collect();
    let count = trees.len();
    trees
        .into_iter()
        .enumerate()
        .map(|(i, mut tree)| {
            tree.set_span(if i + 1 == count { last } else { first });
            tree
        })
        .collect()
}
