//! The first stage of `#[shard_handler]`: from the attribute's arguments and the `impl` block to
//! a [`Handler`] model, or to errors at the spans of the offending code. Every check on what the
//! user wrote lives here; generating code is [`generate`](super::generate)'s job.

use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote, ToTokens};
use syn::ext::IdentExt;
use syn::{FnArg, Ident, ImplItem, ImplItemFn, ItemImpl, Pat, ReturnType, Type, Visibility};

use super::model::{Handler, Hook, HookKind, MessageMethod};
use crate::span_range;

/// Parses and checks `#[shard_handler]` with arguments `args` on the item `input`.
pub(crate) fn parse(args: TokenStream2, input: TokenStream2) -> syn::Result<Handler> {
    if !args.is_empty() {
        return Err(syn::Error::new_spanned(
            args,
            "#[shard_handler] takes no arguments: write `#[shard_handler]`",
        ));
    }
    let item = syn::parse2::<ItemImpl>(input).map_err(|e| {
        syn::Error::new(
            e.span(),
            format!(
                "#[shard_handler] goes on an impl block of the handler type, as in \
                 `#[shard_handler] impl MyHandler {{ .. }}`: {e}"
            ),
        )
    })?;
    parse_impl(item)
}

/// Checks the `impl` block of a handler and describes it. Every mistake among its items is
/// reported, not only the first; a mistake in the block's header stops at that one.
pub(crate) fn parse_impl(mut item: ItemImpl) -> syn::Result<Handler> {
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
    let self_ty = (*item.self_ty).clone();
    let Type::Path(path) = &self_ty else {
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

    let mut errors: Option<syn::Error> = None;
    let mut push_error = |error: syn::Error| match &mut errors {
        Some(errors) => errors.combine(error),
        None => errors = Some(error),
    };
    let mut hooks: Vec<Hook> = Vec::new();
    let mut kept: Vec<ImplItem> = Vec::new();
    let mut messages: Vec<MessageMethod> = Vec::new();
    for impl_item in std::mem::take(&mut item.items) {
        match impl_item {
            ImplItem::Fn(mut method) => {
                if let Some(kind) = HookKind::from_method_name(&method.sig.ident.to_string()) {
                    if kind == HookKind::Activate && method.sig.asyncness.is_some() {
                        // An `async` hook stays an inherent method; the trait impl awaits it.
                        hooks.push(Hook {
                            kind: HookKind::ActivateAsync,
                            method: method.clone(),
                        });
                        kept.push(ImplItem::Fn(method));
                        continue;
                    }
                    // The hooks move into the `ShardHandler` impl, where they cannot be `pub`.
                    method.vis = Visibility::Inherited;
                    hooks.push(Hook { kind, method });
                    continue;
                }
                match check_method(&method) {
                    Ok(message) => {
                        if let Err(error) = check_unique(&messages, &message) {
                            push_error(error);
                        } else {
                            messages.push(message);
                        }
                    }
                    Err(error) => push_error(error),
                }
                kept.push(ImplItem::Fn(method));
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
    Ok(Handler {
        block: item,
        self_ty,
        enum_name,
        messages,
        hooks,
    })
}

/// Checks that `method` handles a message type that no earlier method in `messages` handles and
/// names a wire-enum variant that none of them names.
fn check_unique(messages: &[MessageMethod], method: &MessageMethod) -> syn::Result<()> {
    if let Some(other) = messages
        .iter()
        .find(|m| same_type(&m.message, &method.message))
    {
        return Err(syn::Error::new_spanned(
            &method.message,
            format!(
                "`{}` and `{}` both handle `{}`: one method per message type",
                other.name,
                method.name,
                method.message.to_token_stream()
            ),
        ));
    }
    if let Some(other) = messages.iter().find(|m| m.variant == method.variant) {
        return Err(syn::Error::new_spanned(
            &method.name,
            format!(
                "`{}` and `{}` both name the wire-enum variant `{}`: rename one of them",
                other.name, method.name, method.variant
            ),
        ));
    }
    Ok(())
}

const SIGNATURE: &str = "a handler method takes `(&mut self, key: Key, msg: YourMessage, ctx: &mut ShardContext)` and returns the message's reply type";

/// Added to the errors about a method's receiver and arity: the usual cause is a helper method.
const HELPERS: &str = "every method of a #[shard_handler] block handles a message (or is a lifecycle hook); put helper methods in a separate `impl` block";

/// Checks the signature of a method that is not a hook and describes it as a message method.
fn check_method(f: &ImplItemFn) -> syn::Result<MessageMethod> {
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
    let name = sig.ident.clone();
    let camel = camel_case(&name.unraw().to_string());
    // `self_` would make `Self`, `__` nothing, `_1` a number.
    let Ok(variant) = syn::parse_str::<Ident>(&camel) else {
        return Err(syn::Error::new_spanned(
            &name,
            format!(
                "the wire-enum variant for `{name}` would be named `{camel}`, which cannot name an enum variant: rename the method"
            ),
        ));
    };
    Ok(MessageMethod {
        name,
        message,
        variant,
        is_async: sig.asyncness.is_some(),
        output,
    })
}

/// Whether `ty` is a plain path whose last segment is `ident`, without generic arguments.
fn ends_with(ty: &Type, ident: &str) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none() && p.path.segments.last().is_some_and(|s| s.ident == ident && s.arguments.is_empty()))
}

/// Whether `a` and `b` are written with the same tokens (the macro cannot resolve paths, so
/// `Get` and `crate::Get` count as different types).
fn same_type(a: &Type, b: &Type) -> bool {
    a.to_token_stream().to_string() == b.to_token_stream().to_string()
}

/// `snake_case` as `SnakeCase`.
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

#[cfg(test)]
mod tests {
    use quote::ToTokens;
    use syn::parse_quote;

    use super::*;

    /// The model of a block that must be valid.
    fn model(item: ItemImpl) -> Handler {
        match parse_impl(item) {
            Ok(handler) => handler,
            Err(error) => panic!("expected a valid handler: {error}"),
        }
    }

    /// The messages of every error of a block that must be invalid.
    fn errors(item: ItemImpl) -> Vec<String> {
        match parse_impl(item) {
            Ok(_) => panic!("expected the block to be refused"),
            Err(error) => error.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    fn tokens(tokens: &impl ToTokens) -> String {
        tokens.to_token_stream().to_string()
    }

    #[test]
    fn methods_become_messages_and_hooks_become_hooks() {
        let handler = model(parse_quote! {
            impl Counters {
                pub fn on_activate(&mut self, ctx: &mut ShardContext) {}
                fn increment(&mut self, key: Key, msg: Increment, ctx: &mut ShardContext) -> u64 { 0 }
                async fn get(&mut self, _: Key, msg: crate::Get, _: &mut ShardContext) -> u64 { 0 }
                fn on_restore(&mut self, handoff: Handoff, ctx: &mut ShardContext) {}
                fn on_deactivate(&mut self, ctx: &mut ShardContext) -> Option<Handoff> { None }
            }
        });
        assert_eq!(tokens(&handler.self_ty), "Counters");
        assert_eq!(handler.enum_name, "CountersMessage");

        let messages: Vec<(String, String, String, bool)> = handler
            .messages
            .iter()
            .map(|m| {
                (
                    m.name.to_string(),
                    tokens(&m.message),
                    m.variant.to_string(),
                    m.is_async,
                )
            })
            .collect();
        assert_eq!(
            messages,
            [
                (
                    "increment".into(),
                    "Increment".into(),
                    "Increment".into(),
                    false
                ),
                ("get".into(), "crate :: Get".into(), "Get".into(), true),
            ]
        );

        let hooks: Vec<HookKind> = handler.hooks.iter().map(|h| h.kind).collect();
        assert_eq!(
            hooks,
            [HookKind::Activate, HookKind::Restore, HookKind::Deactivate],
            "in the order written"
        );
        assert!(
            handler
                .hooks
                .iter()
                .all(|h| matches!(h.method.vis, Visibility::Inherited)),
            "hooks move into the trait impl, where they cannot be `pub`"
        );

        // The block repeated in the expansion keeps the message methods, not the hooks.
        let kept: Vec<String> = handler
            .block
            .items
            .iter()
            .map(|item| match item {
                ImplItem::Fn(f) => f.sig.ident.to_string(),
                other => panic!("unexpected item {}", tokens(other)),
            })
            .collect();
        assert_eq!(kept, ["increment", "get"]);
    }

    #[test]
    fn a_block_of_hooks_alone_has_no_messages() {
        let handler = model(parse_quote! {
            impl Idle {
                fn on_activate(&mut self, ctx: &mut ShardContext) {}
            }
        });
        assert!(handler.messages.is_empty());
        assert!(handler.block.items.is_empty());
        assert_eq!(handler.hooks.len(), 1);
    }

    #[test]
    fn variants_are_the_method_names_in_camel_case_and_raw_names_are_unraw() {
        let handler = model(parse_quote! {
            impl store::Kv {
                fn put_if_absent(&mut self, _: Key, _: PutIfAbsent, _: &mut ShardContext) -> bool { true }
                fn r#type(&mut self, _: Key, _: Type, _: &mut ShardContext) {}
                fn r#on_activate(&mut self, _: Key, _: Activate, _: &mut ShardContext) {}
            }
        });
        assert_eq!(
            handler.enum_name, "KvMessage",
            "named after the last segment"
        );
        let variants: Vec<String> = handler
            .messages
            .iter()
            .map(|m| m.variant.to_string())
            .collect();
        assert_eq!(variants, ["PutIfAbsent", "Type", "OnActivate"]);
        assert!(
            handler.hooks.is_empty(),
            "a raw `r#on_activate` is a message method, not a hook"
        );
    }

    #[test]
    fn every_mistake_in_the_block_is_reported() {
        let errors = errors(parse_quote! {
            impl Counters {
                fn helper(&self) {}
                const LIMIT: u32 = 3;
                fn a(&mut self, _: Key, _: Get, _: &mut ShardContext) -> u64 { 0 }
                fn b(&mut self, _: Key, _: Get, _: &mut ShardContext) -> u64 { 0 }
            }
        });
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("expected `&mut self`"), "{errors:?}");
        assert!(errors[1].starts_with("only handler methods"), "{errors:?}");
        assert!(
            errors[2].starts_with("`a` and `b` both handle `Get`"),
            "{errors:?}"
        );
    }

    #[test]
    fn methods_that_name_one_variant_are_refused() {
        let errors = errors(parse_quote! {
            impl Counters {
                fn get_all(&mut self, _: Key, _: GetAll, _: &mut ShardContext) {}
                fn get__all(&mut self, _: Key, _: GetAll2, _: &mut ShardContext) {}
                fn self_(&mut self, _: Key, _: Me, _: &mut ShardContext) {}
            }
        });
        assert_eq!(
            errors,
            [
                "`get_all` and `get__all` both name the wire-enum variant `GetAll`: rename one of them",
                "the wire-enum variant for `self_` would be named `Self`, which cannot name an enum variant: rename the method",
            ]
        );
    }

    #[test]
    fn headers_that_cannot_be_handlers_are_refused() {
        for (item, expected) in [
            (
                parse_quote!(impl Trait for Counters {}),
                "#[shard_handler] goes on an inherent impl block",
            ),
            (
                parse_quote!(
                    impl<T> Counters<T> {}
                ),
                "#[shard_handler] does not support generic handlers",
            ),
            (
                parse_quote!(
                    impl (u8, u8) {}
                ),
                "#[shard_handler] needs a named type",
            ),
        ] {
            let errors = errors(item);
            assert!(errors[0].starts_with(expected), "{errors:?}");
        }
    }

    #[test]
    fn arguments_and_items_that_are_not_impl_blocks_are_refused() {
        let args = parse(quote!(shards = 8), quote!(impl Counters {}))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            args.as_deref(),
            Some("#[shard_handler] takes no arguments: write `#[shard_handler]`")
        );
        let item = parse(
            TokenStream2::new(),
            quote!(
                struct Counters;
            ),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            item.starts_with("#[shard_handler] goes on an impl block of the handler type"),
            "{item}"
        );
    }
}
