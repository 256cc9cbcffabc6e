use weft::sparse_pattern;

#[sparse_pattern]
fn p(q: usize, k: usize) -> Pattern {
    causal
}

fn main() {}
