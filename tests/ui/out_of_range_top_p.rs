use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    vertical_vector(keep = top_p(1.5))
}

fn main() {}
