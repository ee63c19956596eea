//! `ferrite` (under construction).
fn main() {
    eprintln!("ferrite: not built yet");
    std::process::exit(1);
}
