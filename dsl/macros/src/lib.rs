//! # weft-macros: `#[sparse_pattern]`
//!
//! The attribute turns a function whose body is one pattern expression into a function that
//! returns the pattern's IR:
//!
//! ```ignore
//! use weft::sparse_pattern;
//!
//! #[sparse_pattern]
//! fn video() -> Pattern {
//!     sink(64) | local(256) | vertical_vector(q_block = 128, keep = top_p(0.95))
//! }
//!
//! let p = video();                // weft::dsl::Pattern, named "video"
//! println!("{}", p.hash());
//! ```
//!
//! The body is parsed and validated at compile time by the same parser the text format
//! uses (`weft_dsl::syntax`), so a mistake is a compile error at the offending token that
//! says what is accepted. The expansion is a plain struct literal of the IR: no parsing at
//! run time, and the content hash is computed here and written into the function's docs.
//!
//! The generated code names the IR through `::weft::dsl`; a crate that depends on
//! `weft-dsl` directly writes `#[sparse_pattern(crate = ::weft_dsl)]`.

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};
use syn::spanned::Spanned;
use weft_dsl::*;

/// Declares a sparse-attention pattern; see the crate docs for the syntax.
#[proc_macro_attribute]
pub fn sparse_pattern(attr: proc_macro::TokenStream, item: proc_macro::TokenStream) -> proc_macro::TokenStream {
    expand(attr.into(), item.into()).unwrap_or_else(syn::Error::into_compile_error).into()
}

/// The expansion, on `proc_macro2` tokens so it can be unit- and snapshot-tested.
pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let krate = crate_path(attr)?;
    let func: syn::ItemFn = syn::parse2(item)?;
    let sig = &func.sig;
    if let Some(arg) = sig.inputs.first() {
        return Err(syn::Error::new(
            arg.span(),
            "a #[sparse_pattern] function takes no parameters: write q, k, h, nq, nk directly in the body",
        ));
    }
    if let Some(g) = sig.generics.params.first() {
        return Err(syn::Error::new(g.span(), "a #[sparse_pattern] function cannot be generic"));
    }
    if let Some(token) = sig.asyncness.as_ref() {
        return Err(syn::Error::new(token.span(), "a #[sparse_pattern] function cannot be async"));
    }
    if let syn::ReturnType::Type(_, ty) = &sig.output {
        let ok = matches!(&**ty, syn::Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Pattern"));
        if !ok {
            return Err(syn::Error::new(
                ty.span(),
                "a #[sparse_pattern] function returns `Pattern` (or omits the return type)",
            ));
        }
    }
    let body = match func.block.stmts.as_slice() {
        [syn::Stmt::Expr(e, None)] => e,
        [] => {
            return Err(syn::Error::new(
                func.block.span(),
                "the body of a #[sparse_pattern] function is one pattern expression, e.g. `causal & window(1024)`",
            ))
        }
        [first, ..] => return Err(syn::Error::new(
            first.span(),
            "the body of a #[sparse_pattern] function is one pattern expression, without statements or a trailing `;`",
        )),
    };
    let expr = syntax::pattern(body)?;
    let name = sig.ident.to_string();
    let pattern = Pattern::new(name.clone(), expr);
    let hash = pattern.hash();
    let doc = format!(" Sparse pattern `{name}`: `{pattern}`\n\n Content hash: `{hash}`.");
    let ir = lower(&pattern.expr, &krate);
    let attrs = &func.attrs;
    let vis = &func.vis;
    let ident = &sig.ident;
    Ok(quote! {
        #(#attrs)*
        #[doc = ""]
        #[doc = #doc]
        #[must_use]
        #vis fn #ident() -> #krate::Pattern {
            #krate::Pattern {
                name: ::std::string::String::from(#name),
                expr: #ir,
            }
        }
    })
}

fn crate_path(attr: TokenStream) -> syn::Result<TokenStream> {
    if attr.is_empty() {
        return Ok(quote!(::weft::dsl));
    }
    let meta: syn::MetaNameValue = syn::parse2(attr)
        .map_err(|e| syn::Error::new(e.span(), "expected `crate = path::to::weft_dsl` or no arguments"))?;
    if !meta.path.is_ident("crate") {
        return Err(syn::Error::new(meta.path.span(), "the only argument is `crate = path::to::weft_dsl`"));
    }
    Ok(meta.value.to_token_stream())
}

fn boxed(inner: TokenStream) -> TokenStream {
    quote!(::std::boxed::Box::new(#inner))
}

fn var(v: Var, k: &TokenStream) -> TokenStream {
    let id = syn::Ident::new(
        match v {
            Var::Q => "Q",
            Var::K => "K",
            Var::H => "H",
            Var::Nq => "Nq",
            Var::Nk => "Nk",
        },
        proc_macro2::Span::call_site(),
    );
    quote!(#k::Var::#id)
}

fn int(e: &IntExpr, k: &TokenStream) -> TokenStream {
    match e {
        IntExpr::Var(v) => {
            let v = var(*v, k);
            quote!(#k::IntExpr::Var(#v))
        }
        IntExpr::Const(c) => quote!(#k::IntExpr::Const(#c)),
        IntExpr::Neg(a) => {
            let a = boxed(int(a, k));
            quote!(#k::IntExpr::Neg(#a))
        }
        IntExpr::Bin { op, lhs, rhs } => {
            let op = syn::Ident::new(&format!("{op:?}"), proc_macro2::Span::call_site());
            let (l, r) = (boxed(int(lhs, k)), boxed(int(rhs, k)));
            quote!(#k::IntExpr::Bin { op: #k::IntOp::#op, lhs: #l, rhs: #r })
        }
    }
}

fn pred(p: &Pred, k: &TokenStream) -> TokenStream {
    match p {
        Pred::Const(b) => quote!(#k::Pred::Const(#b)),
        Pred::Cmp { op, lhs, rhs } => {
            let op = syn::Ident::new(&format!("{op:?}"), proc_macro2::Span::call_site());
            let (l, r) = (int(lhs, k), int(rhs, k));
            quote!(#k::Pred::Cmp { op: #k::CmpOp::#op, lhs: #l, rhs: #r })
        }
        Pred::And(a, b) | Pred::Or(a, b) => {
            let ctor = if matches!(p, Pred::And(..)) { quote!(And) } else { quote!(Or) };
            let (a, b) = (boxed(pred(a, k)), boxed(pred(b, k)));
            quote!(#k::Pred::#ctor(#a, #b))
        }
        Pred::Not(a) => {
            let a = boxed(pred(a, k));
            quote!(#k::Pred::Not(#a))
        }
    }
}

fn budget(b: &Budget, k: &TokenStream) -> TokenStream {
    match *b {
        Budget::TopK(n) => quote!(#k::Budget::TopK(#n)),
        Budget::TopP(p) => quote!(#k::Budget::TopP(#p)),
        Budget::Threshold(t) => quote!(#k::Budget::Threshold(#t)),
    }
}

/// The IR as a Rust struct literal.
fn lower(e: &PatternExpr, k: &TokenStream) -> TokenStream {
    match e {
        PatternExpr::Static(p) => {
            let p = pred(p, k);
            quote!(#k::PatternExpr::Static(#p))
        }
        PatternExpr::Block(b) => {
            let (bq, bk) = (b.block_q, b.block_k);
            let keep = match &b.keep {
                BlockKeep::Budget(x) => {
                    let x = budget(x, k);
                    quote!(#k::BlockKeep::Budget(#x))
                }
                BlockKeep::Where(p) => {
                    let p = pred(p, k);
                    quote!(#k::BlockKeep::Where(#p))
                }
            };
            quote!(#k::PatternExpr::Block(#k::Block { block_q: #bq, block_k: #bk, keep: #keep }))
        }
        PatternExpr::VerticalVector(v) => {
            let (qb, keep, sink, local) = (v.q_block, budget(&v.keep, k), v.sink, v.local);
            quote!(#k::PatternExpr::VerticalVector(#k::VerticalVector { q_block: #qb, keep: #keep, sink: #sink, local: #local }))
        }
        PatternExpr::VerticalSlash(v) => {
            let (block, last_q, vertical, slash) = (v.block, v.last_q, budget(&v.vertical, k), budget(&v.slash, k));
            quote!(#k::PatternExpr::VerticalSlash(#k::VerticalSlash { block: #block, last_q: #last_q, vertical: #vertical, slash: #slash }))
        }
        PatternExpr::Grid(g) => {
            let stride = g.stride;
            let phase = match g.phase {
                Some(p) => quote!(::std::option::Option::Some(#p)),
                None => quote!(::std::option::Option::None),
            };
            let lines = syn::Ident::new(&format!("{:?}", g.lines), proc_macro2::Span::call_site());
            let sink = g.sink;
            quote!(#k::PatternExpr::Grid(#k::Grid { stride: #stride, phase: #phase, lines: #k::GridLines::#lines, sink: #sink }))
        }
        PatternExpr::Retrieval(r) => {
            let unit = match r.unit {
                Unit::Token => quote!(#k::Unit::Token),
                Unit::Page(n) => quote!(#k::Unit::Page(#n)),
                Unit::Cluster(n) => quote!(#k::Unit::Cluster(#n)),
            };
            let score = match r.score {
                Score::MinMax => quote!(#k::Score::MinMax),
                Score::Centroid => quote!(#k::Score::Centroid),
                Score::Quantized(b) => quote!(#k::Score::Quantized(#b)),
            };
            let (b, sink, recent) = (budget(&r.budget, k), r.sink, r.recent);
            let per = match r.per {
                Per::QueryHead => quote!(#k::Per::QueryHead),
                Per::KvHead => quote!(#k::Per::KvHead),
            };
            quote!(#k::PatternExpr::Retrieval(#k::Retrieval { unit: #unit, score: #score, budget: #b, sink: #sink, recent: #recent, per: #per }))
        }
        PatternExpr::Union(items) | PatternExpr::Intersect(items) => {
            let ctor = if matches!(e, PatternExpr::Union(_)) { quote!(Union) } else { quote!(Intersect) };
            let items = items.iter().map(|i| lower(i, k));
            quote!(#k::PatternExpr::#ctor(::std::vec![#(#items),*]))
        }
        PatternExpr::Permuted { permutation, inner } => {
            let Permutation::Stride(s) = *permutation;
            let inner = boxed(lower(inner, k));
            quote!(#k::PatternExpr::Permuted { permutation: #k::Permutation::Stride(#s), inner: #inner })
        }
        PatternExpr::Ring { workers, layout, inner } => {
            let layout = match layout {
                RingLayout::Contiguous => quote!(#k::RingLayout::Contiguous),
                RingLayout::ZigZag => quote!(#k::RingLayout::ZigZag),
                RingLayout::Striped(n) => quote!(#k::RingLayout::Striped(#n)),
            };
            let inner = boxed(lower(inner, k));
            quote!(#k::PatternExpr::Ring { workers: #workers, layout: #layout, inner: #inner })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_pretty(attr: TokenStream, item: TokenStream) -> String {
        let tokens = expand(attr, item).unwrap_or_else(|e| panic!("{e}"));
        prettyplease::unparse(&syn::parse2(tokens).unwrap())
    }

    #[test]
    fn video_expansion() {
        insta::assert_snapshot!(expand_pretty(
            quote!(),
            quote! {
                /// Sink, a diagonal band and per-block vertical vectors, for video DiTs.
                pub fn video() -> Pattern {
                    sink(64) | local(256) | vertical_vector(q_block = 128, keep = top_p(0.95))
                }
            }
        ));
    }

    #[test]
    fn text_expansion_with_crate_path() {
        insta::assert_snapshot!(expand_pretty(
            quote!(crate = ::weft_dsl),
            quote! {
                fn text() -> Pattern {
                    causal & vertical_slash(vertical = top_k(1000), slash = top_k(64))
                }
            }
        ));
    }

    #[test]
    fn predicate_and_ring_expansion() {
        insta::assert_snapshot!(expand_pretty(
            quote!(),
            quote! {
                fn docs() {
                    ring(workers = 4, layout = zigzag, causal & (q / 512 == k / 512 || k < 4))
                }
            }
        ));
    }

    #[test]
    fn expansion_is_deterministic() {
        let item = quote! { fn g() -> Pattern { permuted(stride(16), block(keep = top_k(4))) } };
        let a = expand(quote!(), item.clone()).unwrap().to_string();
        let b = expand(quote!(), item).unwrap().to_string();
        assert_eq!(a, b);
    }
}
