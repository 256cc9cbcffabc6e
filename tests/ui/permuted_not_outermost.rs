use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    sink(4) | permuted(stride(16), block(keep = top_k(4)))
}

fn main() {}
