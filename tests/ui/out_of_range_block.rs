use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    block(block_q = 100, block_k = 64, keep = top_k(8))
}

fn main() {}
