//! `weft patterns`.

use weft::catalog;

pub(crate) fn print_patterns() {
    println!("Pattern families (combine with `|` for union and `&` for intersection):\n");
    for f in catalog::families() {
        println!("  {:<26} {}", f.name, f.summary);
        for p in &f.params {
            println!("      {:<12} default {:<18} {}", p.name, p.default, p.accepted);
        }
    }
    println!("\nBudgets: top_k(n) keeps the n best; top_p(p) the fewest whose softmax mass reaches p;");
    println!("threshold(t) every candidate within -ln(t) of the best score.\n");
    println!("Built-in patterns (usable wherever a PATTERN is expected):\n");
    for (name, e) in catalog::builtins() {
        println!("  {name:<16} {e}");
    }
}
