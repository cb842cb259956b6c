//! coral-builder links e2fsprogs' libext2fs (src/ext4bulk.rs): dynamically,
//! or statically when the target is built with `crt-static` (the images of
//! `scripts/images`). Both come with Debian's `libext2fs-dev`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let static_crt = std::env::var("CARGO_CFG_TARGET_FEATURE")
        .map(|f| f.split(',').any(|x| x == "crt-static"))
        .unwrap_or(false);
    let (kind, file) = if static_crt {
        ("static", "libext2fs.a")
    } else {
        ("dylib", "libext2fs.so")
    };
    let dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/lib",
    ];
    match dirs
        .iter()
        .find(|d| std::path::Path::new(d).join(file).exists())
    {
        // rustc looks for static libraries itself: tell it where.
        Some(dir) => println!("cargo:rustc-link-search=native={dir}"),
        None => println!(
            "cargo:warning=coral-builder links libext2fs and {file} was not found: install \
             Debian's libext2fs-dev (scripts/setup does)"
        ),
    }
    println!("cargo:rustc-link-lib={kind}=ext2fs");
    println!("cargo:rustc-link-lib={kind}=com_err");
}
