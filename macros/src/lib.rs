//! Procedural macros of clusterfunk: `#[derive(ShardMessage)]` and `#[shard_handler]`.
//!
//! Use them through the `clusterfunk` crate (`use clusterfunk::prelude::*;`), which re-exports
//! them; the code they generate names `::clusterfunk`. Every entry point goes through one
//! `expand` function that turns a `syn::Error` into a `compile_error!` at the offending span.
//! This crate holds no runtime logic: dispatch, actors and routing live in `clusterfunk`.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{
    parse_macro_input, Data, DeriveInput, Expr, ExprLit, FnArg, Ident, ImplItem, ImplItemFn,
    ItemImpl, Lit, Meta, Pat, ReturnType, Type,
};

/// Derives `clusterfunk::ShardMessage` for a message type.
///
/// `#[reply(T)]` names the reply type (required); `#[tag = "name"]` pins the wire tag (default:
/// the type's name). The type must also derive serde's `Serialize` and `Deserialize`.
#[proc_macro_derive(ShardMessage, attributes(reply, tag))]
pub fn derive_shard_message(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(derive_message(input))
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
    if !args.is_empty() {
        return expand(Err(syn::Error::new(
            args.span(),
            "#[shard_handler] takes no arguments",
        )));
    }
    let item = parse_macro_input!(input as ItemImpl);
    expand(handler(item))
}

fn expand(result: syn::Result<TokenStream2>) -> TokenStream {
    result.unwrap_or_else(syn::Error::into_compile_error).into()
}

fn derive_message(input: DeriveInput) -> syn::Result<TokenStream2> {
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new(
            input.generics.span(),
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
    for attr in &input.attrs {
        if attr.path().is_ident("reply") {
            if reply.is_some() {
                return Err(syn::Error::new(
                    attr.span(),
                    "duplicate #[reply(..)]: a message has one reply type",
                ));
            }
            let ty: Type = attr.parse_args().map_err(|e| {
                syn::Error::new(
                    e.span(),
                    "expected a reply type, as in #[reply(u64)] or #[reply(())]",
                )
            })?;
            reply = Some(ty);
        } else if attr.path().is_ident("tag") {
            let Meta::NameValue(nv) = &attr.meta else {
                return Err(syn::Error::new(attr.span(), "expected #[tag = \"name\"]"));
            };
            let Expr::Lit(ExprLit {
                lit: Lit::Str(s), ..
            }) = &nv.value
            else {
                return Err(syn::Error::new(
                    nv.value.span(),
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
            format!("`{name}` needs #[reply(T)] naming the type its handler returns, e.g. #[reply(u64)]"),
        ));
    };
    let tag = tag.unwrap_or_else(|| name.to_string());
    Ok(quote! {
        impl ::clusterfunk::ShardMessage for #name {
            type Reply = #reply;
            const TAG: &'static str = #tag;
        }
    })
}

const HOOKS: [&str; 3] = ["on_activate", "on_deactivate", "on_restore"];

/// One handler method, checked.
struct Method {
    name: Ident,
    message: Type,
    is_async: bool,
    output_span: Span,
}

fn handler(mut item: ItemImpl) -> syn::Result<TokenStream2> {
    if let Some((_, path, _)) = &item.trait_ {
        return Err(syn::Error::new(
            path.span(),
            "#[shard_handler] goes on an inherent impl block (`impl MyHandler { .. }`), not a trait impl",
        ));
    }
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new(
            item.generics.span(),
            "#[shard_handler] does not support generic handlers",
        ));
    }
    let self_ty = item.self_ty.clone();
    let Type::Path(path) = &*self_ty else {
        return Err(syn::Error::new(
            self_ty.span(),
            "#[shard_handler] needs a named type, as in `impl Counters`",
        ));
    };
    let Some(last) = path.path.segments.last() else {
        return Err(syn::Error::new(
            self_ty.span(),
            "#[shard_handler] needs a named type",
        ));
    };
    let enum_name = format_ident!("{}Message", last.ident);

    let mut hooks: Vec<ImplItemFn> = Vec::new();
    let mut kept: Vec<ImplItem> = Vec::new();
    let mut methods: Vec<Method> = Vec::new();
    for impl_item in std::mem::take(&mut item.items) {
        match impl_item {
            ImplItem::Fn(f) if HOOKS.contains(&f.sig.ident.to_string().as_str()) => hooks.push(f),
            ImplItem::Fn(f) => {
                let method = check_method(&f)?;
                if let Some(other) = methods.iter().find(|m| same_type(&m.message, &method.message)) {
                    return Err(syn::Error::new(
                        method.message.span(),
                        format!(
                            "`{}` and `{}` both handle `{}`: one method per message type",
                            other.name,
                            method.name,
                            method.message.to_token_stream()
                        ),
                    ));
                }
                methods.push(method);
                kept.push(ImplItem::Fn(f));
            }
            other => {
                return Err(syn::Error::new(
                    other.span(),
                    "only handler methods and lifecycle hooks belong in a #[shard_handler] block; move other items to a separate impl block",
                ))
            }
        }
    }
    item.items = kept;

    let variants: Vec<Ident> = methods
        .iter()
        .map(|m| format_ident!("{}", camel_case(&m.name.to_string())))
        .collect();
    let messages: Vec<&Type> = methods.iter().map(|m| &m.message).collect();
    let handles = methods.iter().map(|m| handles_impl(&self_ty, m));

    Ok(quote! {
        #item

        impl ::clusterfunk::ShardHandler for #self_ty {
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

        impl ::clusterfunk::__private::WireMessage<#self_ty> for #enum_name {
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
                ::std::result::Result::Err(::clusterfunk::__private::unknown_tag(tag))
            }

            fn route_any(
                self,
                router: &::std::sync::Arc<::clusterfunk::__private::Router<#self_ty>>,
                key: ::clusterfunk::Key,
            ) -> ::clusterfunk::__private::BoxFuture<'static, ::std::result::Result<::std::boxed::Box<dyn ::std::any::Any + ::std::marker::Send>, ::clusterfunk::Error>> {
                match self {
                    #( Self::#variants(m) => ::clusterfunk::__private::route_any(router, key, m), )*
                }
            }

            fn route_wire(
                self,
                router: &::std::sync::Arc<::clusterfunk::__private::Router<#self_ty>>,
                key: ::clusterfunk::Key,
            ) -> ::clusterfunk::__private::BoxFuture<'static, ::std::result::Result<::std::vec::Vec<u8>, ::clusterfunk::Error>> {
                match self {
                    #( Self::#variants(m) => ::clusterfunk::__private::route_wire(router, key, m), )*
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
        output_span,
    } = m;
    let reply_ty = quote_spanned!(*output_span=> <#message as ::clusterfunk::ShardMessage>::Reply);
    let body = if *is_async {
        quote! {
            ::clusterfunk::__private::Handled::Pending(::std::boxed::Box::pin(async move {
                let mut slot = slot;
                let reply: #reply_ty = Self::#name(&mut slot.handler, key, msg, &mut slot.context).await;
                (slot, reply)
            }))
        }
    } else {
        quote! {
            let mut slot = slot;
            let reply: #reply_ty = Self::#name(&mut slot.handler, key, msg, &mut slot.context);
            ::clusterfunk::__private::Handled::Ready(slot, reply)
        }
    };
    quote_spanned! {message.span()=>
        impl ::clusterfunk::__private::Handles<#message> for #self_ty {
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

fn check_method(f: &ImplItemFn) -> syn::Result<Method> {
    let sig = &f.sig;
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "handler methods cannot be generic",
        ));
    }
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_some() => {}
        Some(other) => {
            return Err(syn::Error::new(
                other.span(),
                format!("expected `&mut self`: {SIGNATURE}"),
            ))
        }
        None => {
            return Err(syn::Error::new(
                sig.span(),
                format!("missing `&mut self`: {SIGNATURE}"),
            ))
        }
    }
    let rest: Vec<&FnArg> = inputs.collect();
    if rest.len() != 3 {
        return Err(syn::Error::new(
            sig.inputs.span(),
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
                    return Err(syn::Error::new(
                        t.pat.span(),
                        "use a plain name or `_` for handler arguments",
                    ));
                }
                Ok((*t.ty).clone())
            }
            FnArg::Receiver(r) => Err(syn::Error::new(r.span(), SIGNATURE)),
        }
    };
    let key_ty = typed(rest[0])?;
    if !ends_with(&key_ty, "Key") {
        return Err(syn::Error::new(
            key_ty.span(),
            format!("the key argument must be of type `Key`: {SIGNATURE}"),
        ));
    }
    let message = typed(rest[1])?;
    if matches!(message, Type::Reference(_)) {
        return Err(syn::Error::new(
            message.span(),
            "take the message by value, not by reference",
        ));
    }
    let ctx_ty = typed(rest[2])?;
    let ctx_ok = matches!(&ctx_ty, Type::Reference(r) if r.mutability.is_some() && ends_with(&r.elem, "ShardContext"));
    if !ctx_ok {
        return Err(syn::Error::new(
            ctx_ty.span(),
            format!("the context argument must be `&mut ShardContext`: {SIGNATURE}"),
        ));
    }
    let output_span = match &sig.output {
        ReturnType::Default => sig.ident.span(),
        ReturnType::Type(_, ty) => ty.span(),
    };
    Ok(Method {
        name: sig.ident.clone(),
        message,
        is_async: sig.asyncness.is_some(),
        output_span,
    })
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
