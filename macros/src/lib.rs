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

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2, TokenTree};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    Data, DeriveInput, Expr, ExprLit, FnArg, Ident, ImplItem, ImplItemFn, ItemImpl, Lit, Meta, Pat,
    ReturnType, Type, Visibility,
};

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
/// `on_activate`, `on_deactivate` and `on_restore` override the lifecycle hooks. Generates the
/// wire enum `<Type>Message` with one variant per message and the dispatch.
#[proc_macro_attribute]
pub fn shard_handler(args: TokenStream, input: TokenStream) -> TokenStream {
    let args = TokenStream2::from(args);
    let original = TokenStream2::from(input.clone());
    let expanded = if args.is_empty() {
        syn::parse::<ItemImpl>(input)
            .map_err(|e| {
                syn::Error::new(
                    e.span(),
                    format!(
                        "#[shard_handler] goes on an impl block of the handler type, as in \
                         `#[shard_handler] impl MyHandler {{ .. }}`: {e}"
                    ),
                )
            })
            .and_then(handler)
    } else {
        Err(syn::Error::new_spanned(
            args,
            "#[shard_handler] takes no arguments: write `#[shard_handler]`",
        ))
    };
    expand(expanded, original)
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

const HOOKS: [&str; 3] = ["on_activate", "on_deactivate", "on_restore"];

/// One handler method, checked.
struct Method {
    name: Ident,
    message: Type,
    is_async: bool,
    /// The first and last spans of the return type (of the name when there is none): where a
    /// return type that is not the message's reply type is reported.
    output: (Span, Span),
}

fn handler(mut item: ItemImpl) -> syn::Result<TokenStream2> {
    if let Some((bang, path, for_token)) = &item.trait_ {
        return Err(syn::Error::new_spanned(
            quote!(#bang #path #for_token),
            "#[shard_handler] goes on an inherent impl block (`impl MyHandler { .. }`), not a trait impl",
        ));
    }
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &item.generics,
            "#[shard_handler] does not support generic handlers",
        ));
    }
    let self_ty = item.self_ty.clone();
    let Type::Path(path) = &*self_ty else {
        return Err(syn::Error::new_spanned(
            &self_ty,
            "#[shard_handler] needs a named type, as in `impl Counters`",
        ));
    };
    let Some(last) = path.path.segments.last() else {
        return Err(syn::Error::new_spanned(
            &self_ty,
            "#[shard_handler] needs a named type",
        ));
    };
    let enum_name = format_ident!("{}Message", last.ident.unraw());

    // Every mistake in the block is reported, not only the first.
    let mut errors: Option<syn::Error> = None;
    let mut push_error = |error: syn::Error| match &mut errors {
        Some(errors) => errors.combine(error),
        None => errors = Some(error),
    };
    let mut hooks: Vec<ImplItemFn> = Vec::new();
    let mut kept: Vec<ImplItem> = Vec::new();
    let mut methods: Vec<Method> = Vec::new();
    let mut variants: Vec<Ident> = Vec::new();
    for impl_item in std::mem::take(&mut item.items) {
        match impl_item {
            ImplItem::Fn(mut f) if HOOKS.contains(&f.sig.ident.to_string().as_str()) => {
                // The hooks move into the `ShardHandler` impl, where they cannot be `pub`.
                f.vis = Visibility::Inherited;
                hooks.push(f);
            }
            ImplItem::Fn(f) => {
                match check_method(&f) {
                    Ok(method) => {
                        let camel = camel_case(&method.name.unraw().to_string());
                        // `self_` would make `Self`, `__` nothing, `_1` a number.
                        let Ok(variant) = syn::parse_str::<Ident>(&camel) else {
                            push_error(syn::Error::new_spanned(
                                &method.name,
                                format!(
                                    "the wire-enum variant for `{}` would be named `{camel}`, which cannot name an enum variant: rename the method",
                                    method.name
                                ),
                            ));
                            continue;
                        };
                        if let Some(other) = methods
                            .iter()
                            .find(|m| same_type(&m.message, &method.message))
                        {
                            push_error(syn::Error::new_spanned(
                                &method.message,
                                format!(
                                    "`{}` and `{}` both handle `{}`: one method per message type",
                                    other.name,
                                    method.name,
                                    method.message.to_token_stream()
                                ),
                            ));
                        } else if let Some(i) = variants.iter().position(|v| *v == variant) {
                            push_error(syn::Error::new_spanned(
                                &method.name,
                                format!(
                                    "`{}` and `{}` both name the wire-enum variant `{variant}`: rename one of them",
                                    methods[i].name, method.name
                                ),
                            ));
                        } else {
                            methods.push(method);
                            variants.push(variant);
                        }
                    }
                    Err(error) => push_error(error),
                }
                kept.push(ImplItem::Fn(f));
            }
            other => push_error(syn::Error::new_spanned(
                &other,
                "only handler methods and lifecycle hooks belong in a #[shard_handler] block; \
                 move other items to a separate `impl` block",
            )),
        }
    }
    if let Some(errors) = errors {
        return Err(errors);
    }
    item.items = kept;

    let messages: Vec<&Type> = methods.iter().map(|m| &m.message).collect();
    let handles = methods.iter().map(|m| handles_impl(&self_ty, m));
    // The message type's spans on the calls that need it to be a `ShardMessage` (the callee and
    // the argument), so that a type that is not one is reported there, not at the attribute.
    let routes = |route: &str, extra: TokenStream2| -> Vec<TokenStream2> {
        let route = format_ident!("{route}");
        messages
            .iter()
            .zip(&variants)
            .map(|(message, variant)| {
                let spans = span_range(message);
                let callee = respan(quote!(::clusterfunk::__private::#route), spans);
                let m = Ident::new("m", spans.0);
                quote!(Self::#variant(#m) => #callee(router, key, #m #extra),)
            })
            .collect()
    };
    let (route_any, route_wire) = (
        routes("route_any", quote!()),
        routes("route_wire", quote!(, origin)),
    );
    // The handler type's spans on the impls that need it to be `Send`, `Unpin` and `'static`.
    let self_spans = span_range(&self_ty);
    let impl_handler = respan(quote!(impl ::clusterfunk::ShardHandler for), self_spans);
    let impl_wire = respan(
        quote!(impl ::clusterfunk::__private::WireMessage<#self_ty> for),
        self_spans,
    );

    Ok(quote! {
        #item

        #impl_handler #self_ty {
            type Message = #enum_name;
            #(#hooks)*
        }

        /// The wire enum of this handler: one variant per message type (generated by
        /// `#[shard_handler]`).
        #[allow(dead_code, private_interfaces)]
        pub enum #enum_name {
            #(
                #[allow(missing_docs)]
                #variants(#messages),
            )*
        }

        #impl_wire #enum_name {
            const TAGS: &'static [&'static str] = &[#(<#messages as ::clusterfunk::ShardMessage>::TAG),*];

            fn from_any(
                msg: ::std::boxed::Box<dyn ::std::any::Any + ::std::marker::Send>,
            ) -> ::std::result::Result<Self, ::std::boxed::Box<dyn ::std::any::Any + ::std::marker::Send>> {
                #(
                    let msg = match msg.downcast::<#messages>() {
                        ::std::result::Result::Ok(m) => return ::std::result::Result::Ok(Self::#variants(*m)),
                        ::std::result::Result::Err(m) => m,
                    };
                )*
                ::std::result::Result::Err(msg)
            }

            fn decode(tag: &str, bytes: &[u8]) -> ::std::result::Result<Self, ::clusterfunk::Error> {
                #(
                    if tag == <#messages as ::clusterfunk::ShardMessage>::TAG {
                        return ::clusterfunk::__private::decode::<#messages>(bytes).map(Self::#variants);
                    }
                )*
                let _ = bytes;
                ::std::result::Result::Err(::clusterfunk::__private::unknown_tag(tag))
            }

            fn route_any<R: ::clusterfunk::__private::Dispatch<#self_ty>>(
                self,
                router: &::std::sync::Arc<R>,
                key: ::clusterfunk::Key,
            ) -> ::clusterfunk::__private::BoxFuture<'static, ::std::result::Result<::std::boxed::Box<dyn ::std::any::Any + ::std::marker::Send>, ::clusterfunk::Error>> {
                match self {
                    #(#route_any)*
                }
            }

            fn route_wire<R: ::clusterfunk::__private::Dispatch<#self_ty>>(
                self,
                router: &::std::sync::Arc<R>,
                key: ::clusterfunk::Key,
                origin: ::clusterfunk::__private::Origin,
            ) -> ::clusterfunk::__private::BoxFuture<'static, ::std::result::Result<::std::vec::Vec<u8>, ::clusterfunk::Error>> {
                match self {
                    #(#route_wire)*
                }
            }
        }

        #(#handles)*
    })
}

fn handles_impl(self_ty: &Type, m: &Method) -> TokenStream2 {
    let Method {
        name,
        message,
        is_async,
        output,
    } = m;
    // A method returning something other than the reply type is a type mismatch between the
    // call (spanned as the method's return type) and the annotation `let reply: <M as
    // ShardMessage>::Reply` (spanned as the message type): the compiler reports "expected the
    // reply type, found the return type" at the return type, "expected due to this" at `M`.
    let reply_ty = respan(
        quote!(<#message as ::clusterfunk::ShardMessage>::Reply),
        span_range(message),
    );
    let call = respan(
        quote!(Self::#name(&mut slot.handler, key, msg, &mut slot.context)),
        *output,
    );
    let body = if *is_async {
        let call = respan(quote!(#call.await), *output);
        quote! {
            ::clusterfunk::__private::Handled::Pending(::std::boxed::Box::pin(async move {
                let mut slot = slot;
                let reply: #reply_ty = #call;
                (slot, reply)
            }))
        }
    } else {
        quote! {
            let mut slot = slot;
            let reply: #reply_ty = #call;
            ::clusterfunk::__private::Handled::Ready(slot, reply)
        }
    };
    let impl_handles = respan(
        quote!(impl ::clusterfunk::__private::Handles<#message> for),
        span_range(message),
    );
    quote_spanned! {message.span()=>
        #impl_handles #self_ty {
            fn handle(
                slot: ::clusterfunk::__private::Slot<Self>,
                key: ::clusterfunk::Key,
                msg: #message,
            ) -> ::clusterfunk::__private::Handled<Self, <#message as ::clusterfunk::ShardMessage>::Reply> {
                #body
            }
        }
    }
}

const SIGNATURE: &str = "a handler method takes `(&mut self, key: Key, msg: YourMessage, ctx: &mut ShardContext)` and returns the message's reply type";

/// Added to the errors about a method's receiver and arity: the usual cause is a helper method.
const HELPERS: &str = "every method of a #[shard_handler] block handles a message (or is a lifecycle hook); put helper methods in a separate `impl` block";

fn check_method(f: &ImplItemFn) -> syn::Result<Method> {
    let sig = &f.sig;
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "handler methods cannot be generic",
        ));
    }
    if let Some(where_clause) = &sig.generics.where_clause {
        return Err(syn::Error::new_spanned(
            where_clause,
            "handler methods cannot have a `where` clause",
        ));
    }
    if let Some(unsafety) = &sig.unsafety {
        return Err(syn::Error::new_spanned(
            unsafety,
            "handler methods cannot be `unsafe`",
        ));
    }
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r))
            if r.reference.is_some() && r.mutability.is_some() && r.colon_token.is_none() => {}
        Some(other) => {
            return Err(syn::Error::new_spanned(
                other,
                format!("expected `&mut self`: {SIGNATURE}; {HELPERS}"),
            ))
        }
        None => {
            let (fn_token, ident) = (&sig.fn_token, &sig.ident);
            return Err(syn::Error::new_spanned(
                quote!(#fn_token #ident),
                format!("`{}` has no `&mut self`: {SIGNATURE}; {HELPERS}", sig.ident),
            ));
        }
    }
    let rest: Vec<&FnArg> = inputs.collect();
    if rest.len() != 3 {
        return Err(syn::Error::new_spanned(
            &sig.inputs,
            format!(
                "`{}` takes {} argument(s) after `&mut self`, expected 3: {SIGNATURE}",
                sig.ident,
                rest.len()
            ),
        ));
    }
    let typed = |arg: &FnArg| -> syn::Result<Type> {
        match arg {
            FnArg::Typed(t) => {
                if !matches!(&*t.pat, Pat::Ident(_) | Pat::Wild(_)) {
                    return Err(syn::Error::new_spanned(
                        &t.pat,
                        "use a plain name or `_` for handler arguments",
                    ));
                }
                Ok((*t.ty).clone())
            }
            FnArg::Receiver(r) => Err(syn::Error::new_spanned(r, SIGNATURE)),
        }
    };
    let key_ty = typed(rest[0])?;
    if !ends_with(&key_ty, "Key") {
        return Err(syn::Error::new_spanned(
            &key_ty,
            format!("the key argument must be of type `Key`: {SIGNATURE}"),
        ));
    }
    let message = typed(rest[1])?;
    if let Type::Reference(r) = &message {
        let elem = &r.elem;
        return Err(syn::Error::new_spanned(
            &message,
            format!(
                "take the message by value (`{}`), not by reference",
                elem.to_token_stream()
            ),
        ));
    }
    let ctx_ty = typed(rest[2])?;
    let ctx_ok = matches!(&ctx_ty, Type::Reference(r) if r.mutability.is_some() && ends_with(&r.elem, "ShardContext"));
    if !ctx_ok {
        return Err(syn::Error::new_spanned(
            &ctx_ty,
            format!("the context argument must be `&mut ShardContext`: {SIGNATURE}"),
        ));
    }
    let output = match &sig.output {
        ReturnType::Default => (sig.ident.span(), sig.ident.span()),
        ReturnType::Type(_, ty) => span_range(ty),
    };
    Ok(Method {
        name: sig.ident.clone(),
        message,
        is_async: sig.asyncness.is_some(),
        output,
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

fn ends_with(ty: &Type, ident: &str) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none() && p.path.segments.last().is_some_and(|s| s.ident == ident && s.arguments.is_empty()))
}

fn same_type(a: &Type, b: &Type) -> bool {
    a.to_token_stream().to_string() == b.to_token_stream().to_string()
}

fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = true;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}
