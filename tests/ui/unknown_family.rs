use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    sink(64) | vertical_vectr(q_block = 64)
}

fn main() {}
