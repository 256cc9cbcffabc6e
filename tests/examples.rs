//! Every example in `examples/` is built by `cargo test` and run here.

macro_rules! example {
    ($name:ident, $file:literal) => {
        #[path = $file]
        mod $name;
        #[test]
        fn $name() {
            $name::main().unwrap();
        }
    };
}

example!(video, "../examples/video.rs");
example!(text, "../examples/text.rs");
example!(grid, "../examples/grid.rs");
example!(permuted_grid, "../examples/permuted_grid.rs");
example!(ring, "../examples/ring.rs");
example!(retrieval, "../examples/retrieval.rs");
