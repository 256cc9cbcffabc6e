use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    retrieval(unit = token, score = min_max, keep = top_k(64))
}

fn main() {}
