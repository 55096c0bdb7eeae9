//! The SQL migrations are embedded at compile time (`store/migrate.rs`): a new file in
//! `migrations/` must rebuild the crate even when no Rust file changed.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
