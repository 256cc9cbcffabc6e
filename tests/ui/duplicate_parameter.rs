use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    vertical_vector(keep = top_k(8), keep = top_k(9))
}

fn main() {}
