//! What the kernel sources compile to, without a GPU: every module variant the crate builds
//! for the default configurations and the autotuner's search spaces (row kernels, decode,
//! prefill), compiled by NVRTC for sm_90 (sm_90a where the source asks for it) with the
//! options a [`Device`](crate::Device) uses, and a manifest of the SHA-256 of each variant's
//! PTX, cubin and each kernel's cubin sections. A change to the sources that should change
//! nothing (a split, renames, comments, formatting) is checked by comparing two manifests.
//!
//! An ignored test, so that `cargo test` does not need NVRTC; run it with the NVRTC library on
//! the loader's path (the `nvidia-cuda-nvrtc` wheel from PyPI has it):
//!
//! ```text
//! LD_LIBRARY_PATH=/path/to/nvidia/cu13/lib ROTQ_CUBINS=manifest.json \
//!     [ROTQ_CUBINS_BEFORE=old.json] [ROTQ_CUBINS_JOBS=2] [ROTQ_CUBINS_ONLY=substring] \
//!     cargo test -p rotq-cuda --release --lib cubins -- --ignored --nocapture
//! ```
//!
//! NVRTC 13.0 is not deterministic on a few modules (the tensor-core decode kernel with several
//! query rows per block over q8_0 at 128 dimensions gave 6 or 7 distinct cubins in 8 compiles of
//! one source): a variant that differs is compiled again, from both sources, before its
//! difference is believed.
//!
//! The sources, PTX and cubins are left beside the manifest (in `manifest.json.d/`), to compile
//! again or disassemble.
//! With `ROTQ_CUBINS_BEFORE` the test also compares the two manifests and prints, per variant,
//! whether the cubin is the same, and if not, which kernels' sections are; the ignored test
//! `cubins_compare` compares two manifests already written (`ROTQ_CUBINS` with
//! `ROTQ_CUBINS_BEFORE`) without compiling.

use crate::decode_module::{DecodeCall, Shape};
use crate::flash_module::FlashShape;
use crate::kernel::{self, Rotate, RowConfig, Transform};
use crate::{DecodeConfig, PrefillConfig};
use cudarc::nvrtc::{result, sys};
use rotq_reference::{KvFormat, Rotation};
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// An H100's opt-in shared memory per block (the shapes shrink to fit it, as on the device).
const MAX_SMEM: usize = 232_448;
const SM90: (u32, u32) = (9, 0);

/// One variant: a name that says what it is (stable across refactors of the sources) and the
/// module's source.
struct Variant {
    name: String,
    source: String,
}

fn elem_name(elem: u32) -> &'static str {
    ["f32", "f16", "bf16"][elem as usize]
}

/// The row kernels: rotations, and the codec modules (rotate-quantize, dequantize, shift).
fn row_variants(out: &mut Vec<Variant>) {
    let mut configs = RowConfig::search_space();
    configs.push(RowConfig::codec_default());
    let mut rotation = |name: &str, t: &Transform, elem: u32, cfg: RowConfig| {
        if let Ok(g) = kernel::geometry(t, cfg, false, 0, MAX_SMEM) {
            let (_, source) = kernel::source(t, g, elem, Rotate::Transform, None);
            out.push(Variant {
                name: format!("rotate/{}/{name}/{cfg:?}", elem_name(elem)),
                source,
            });
        }
    };
    let transforms: Vec<(&str, Transform)> = [
        ("hadamard128", Rotation::hadamard(128)),
        ("hadamard64", Rotation::hadamard(64)),
        ("hadamard4096", Rotation::hadamard(4096)),
        ("hadamard96", Rotation::hadamard(96)),
        ("hadamard160", Rotation::hadamard(160)),
        ("block64x4", Rotation::block_hadamard(256, 64)),
    ]
    .into_iter()
    .map(|(n, r)| (n, Transform::of(&r.unwrap()).unwrap()))
    .collect();
    for elem in 0..3 {
        for (i, (name, t)) in transforms.iter().enumerate() {
            // The whole search space for the common size, the default for the others.
            let cfgs: Vec<RowConfig> = if i == 0 {
                configs.clone()
            } else {
                vec![RowConfig::default()]
            };
            for cfg in cfgs {
                rotation(name, t, elem, cfg);
            }
        }
    }
    let codec = |out: &mut Vec<Variant>, f: KvFormat, dim: usize, elem: u32, rotate, cfg| {
        let t = if rotate == Rotate::Transform {
            Transform::of(&Rotation::hadamard(dim).unwrap()).unwrap()
        } else {
            Transform::identity(dim).unwrap()
        };
        let row_bytes = f.row_bytes(dim).unwrap();
        if let Ok(g) = kernel::geometry(&t, cfg, true, row_bytes, MAX_SMEM) {
            let (_, source) = kernel::source(&t, g, elem, rotate, Some(f));
            out.push(Variant {
                name: format!(
                    "codec/{}/{f}/d{dim}/rotate{}/{cfg:?}",
                    elem_name(elem),
                    rotate as u32
                ),
                source,
            });
        }
    };
    for f in [KvFormat::Q8_0, KvFormat::Q4_0, KvFormat::F16] {
        for cfg in &configs {
            codec(out, f, 128, 1, Rotate::Transform, *cfg);
        }
    }
    // Every format of the registry.
    for f in KvFormat::ALL {
        for dim in [64, 128] {
            for elem in 0..3 {
                for rotate in [Rotate::None, Rotate::Transform, Rotate::Matrix] {
                    codec(out, f, dim, elem, rotate, RowConfig::codec_default());
                }
            }
        }
    }
}

/// The decode modules (and those of prefill through the decode kernel).
fn decode_variants(out: &mut Vec<Variant>) {
    let mut configs: Vec<DecodeConfig> = DecodeConfig::search_space()
        .into_iter()
        .filter(|c| c.splits == 0)
        .collect();
    configs.push(DecodeConfig::default());
    let mut push = |call: DecodeCall, cfg: DecodeConfig| {
        if let Ok(shape) = Shape::fit(cfg, call, MAX_SMEM) {
            out.push(Variant {
                name: format!(
                    "decode/{}/{}-{}/d{}-{}/g{}/hkv{}/shared{}/w{}-tc{}-pairs{}-splitv{}",
                    elem_name(call.elem),
                    call.k_format,
                    call.v_format,
                    call.d,
                    call.d_v,
                    call.group,
                    call.h_kv,
                    call.shared as u8,
                    cfg.warps,
                    cfg.tensor_cores as u8,
                    cfg.pairs as u8,
                    cfg.split_v as u8
                ),
                source: shape.source().unwrap().1,
            });
            // The batch API's masked module, of the f32 kernel.
            if !shape.tensor_cores {
                out.push(Variant {
                    name: format!("{}-mask", out.last().unwrap().name),
                    source: shape.source_for(true).unwrap().1,
                });
            }
        }
    };
    let call = |elem, k_format, v_format, d, group, shared| DecodeCall {
        elem,
        k_format,
        v_format,
        d,
        d_v: d,
        group,
        h_kv: 8,
        shared,
    };
    // The search space for the common formats and head sizes.
    for elem in 0..3 {
        for f in [KvFormat::Q8_0, KvFormat::Q4_0, KvFormat::F16] {
            for d in [64, 128] {
                for cfg in &configs {
                    push(call(elem, f, f, d, 4, false), *cfg);
                }
            }
        }
    }
    // Defaults: other formats, mixed formats, groups, prefill rows, a large head.
    let default = DecodeConfig::default();
    for elem in 0..3 {
        for (k, v) in [
            (KvFormat::Q8_0, KvFormat::Q4_0),
            (KvFormat::Q5_0, KvFormat::Q5_0),
            (KvFormat::Iq4Nl, KvFormat::Iq4Nl),
            (KvFormat::Q4_1, KvFormat::Q4_1),
            (KvFormat::Fp8E4m3, KvFormat::Q8_0),
            (KvFormat::Q6_0, KvFormat::Int4),
            (KvFormat::Tq4, KvFormat::Tq4),
            (KvFormat::Tq3, KvFormat::Q8_0),
            (KvFormat::Q4_0, KvFormat::Tq2),
            (KvFormat::Tq4Qjl, KvFormat::Tq3Qjl),
            (KvFormat::Tq2Qjl, KvFormat::Q8_0),
            (KvFormat::VllmFp8, KvFormat::VllmV4),
            (KvFormat::VllmK4, KvFormat::VllmV4),
            (KvFormat::VllmK3, KvFormat::VllmV3),
            (KvFormat::Q8_0, KvFormat::VllmK4),
        ] {
            push(call(elem, k, v, 128, 4, false), default);
        }
        push(
            call(elem, KvFormat::Tq4, KvFormat::Tq3, 64, 8, false),
            default,
        );
        for f in [KvFormat::Q8_0, KvFormat::Q4_0] {
            for group in [1, 8] {
                push(call(elem, f, f, 128, group, false), default);
            }
            for group in [1, 4, 8] {
                push(call(elem, f, f, 128, group, true), default);
            }
            push(call(elem, f, f, 256, 4, false), default);
            // Rows of 34 and 18 bytes: the 2-byte copy paths.
            push(call(elem, f, f, 32, 4, false), default);
            let single = DecodeConfig {
                pairs: false,
                split_v: false,
                ..default
            };
            push(call(elem, f, f, 32, 4, false), single);
            push(call(elem, f, f, 32, 4, true), default);
        }
    }
}

/// The flash prefill modules.
fn flash_variants(out: &mut Vec<Variant>) {
    let mut push = |cfg: PrefillConfig, elem, k: KvFormat, v: KvFormat, d: usize, group| {
        let asked = FlashShape::asked(cfg, elem, k, v, d, d, group);
        let shape = if cfg.specialized_on(SM90, d, d) {
            Ok(asked.specialized(cfg))
        } else {
            asked.fit(MAX_SMEM)
        };
        if let Ok(shape) = shape {
            out.push(Variant {
                name: format!(
                    "prefill/{}/{k}-{v}/d{d}/g{group}/w{}-bn{}-mt{}-ws{}",
                    elem_name(elem),
                    cfg.warps,
                    cfg.block_n,
                    cfg.m_tiles,
                    cfg.specialized as u8
                ),
                source: shape.source().unwrap().1,
            });
        }
    };
    for elem in 1..3 {
        for f in [KvFormat::Q8_0, KvFormat::Q4_0, KvFormat::F16] {
            for d in [64, 128] {
                for cfg in PrefillConfig::search_space() {
                    push(cfg, elem, f, f, d, 4);
                }
            }
        }
        let default = PrefillConfig::default();
        for (k, v) in [
            (KvFormat::Q8_0, KvFormat::Q4_0),
            (KvFormat::Q5_0, KvFormat::Q5_0),
            (KvFormat::Iq4Nl, KvFormat::Iq4Nl),
            (KvFormat::Fp8E4m3, KvFormat::Q8_0),
            (KvFormat::Q6_0, KvFormat::Int4),
        ] {
            push(default, elem, k, v, 128, 4);
        }
        for f in [KvFormat::Q8_0, KvFormat::Q4_0] {
            for group in [1, 8] {
                push(default, elem, f, f, 128, group);
            }
            push(default, elem, f, f, 256, 4);
            push(default, elem, f, f, 32, 4);
            let plain = PrefillConfig {
                warps: 4,
                specialized: false,
                ..default
            };
            push(plain, elem, f, f, 32, 4);
        }
    }
}

/// Every variant, in a stable order, named uniquely.
fn variants() -> Vec<Variant> {
    let mut out = Vec::new();
    row_variants(&mut out);
    decode_variants(&mut out);
    flash_variants(&mut out);
    // Explicit rotation matrices: each element type in and out.
    for n in [64, 128] {
        for (i, o) in [(0, 0), (1, 1), (2, 2), (1, 0), (2, 0), (0, 1), (0, 2)] {
            out.push(Variant {
                name: format!("matrix/d{n}/{}-{}", elem_name(i), elem_name(o)),
                source: crate::matrix::source(n, i, o).1,
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|v| seen.insert(v.name.clone()));
    out
}

/// PTX and cubin of `source` as a device of compute capability 9.0 would compile it.
fn compile(source: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    let options = crate::device::nvrtc_options(SM90, source);
    let src = CString::new(source).map_err(|e| e.to_string())?;
    let prog = result::create_program(&src, None).map_err(|e| format!("{e:?}"))?;
    // SAFETY: `prog` was just created and is destroyed once, at the end; the buffers passed to
    // NVRTC are sized by its own size queries.
    unsafe {
        let compiled = result::compile_program(prog, &options);
        let outcome = match compiled {
            Err(e) => {
                let log = result::get_program_log(prog).unwrap_or_default();
                let log: Vec<u8> = log.iter().map(|&c| c as u8).collect();
                Err(format!("{e:?}: {}", String::from_utf8_lossy(&log)))
            }
            Ok(()) => {
                let ptx: Vec<u8> = result::get_ptx(prog)
                    .map_err(|e| format!("{e:?}"))?
                    .iter()
                    .map(|&c| c as u8)
                    .collect();
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| format!("{e:?}"))?;
                let mut cubin = vec![0u8; size];
                sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                    .result()
                    .map_err(|e| format!("{e:?}"))?;
                Ok((ptx, cubin))
            }
        };
        result::destroy_program(prog).map_err(|e| format!("{e:?}"))?;
        outcome
    }
}

/// The sections of an ELF64 cubin that belong to one kernel (`.text.NAME`, `.nv.info.NAME`,
/// `.nv.shared.NAME`, `.nv.constant0.NAME`, ...), by section name: their bytes, or for sections
/// without bytes (shared memory), their size.
fn kernel_sections(cubin: &[u8]) -> Vec<(String, Vec<u8>)> {
    let u16_at = |o: usize| u16::from_le_bytes([cubin[o], cubin[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(cubin[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(cubin[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(header(shstrndx) + 0x18);
    let mut out = Vec::new();
    for i in 0..shnum {
        let h = header(i);
        let name_at = strtab + u32_at(h);
        let end = cubin[name_at..].iter().position(|&b| b == 0).unwrap();
        let name = String::from_utf8_lossy(&cubin[name_at..name_at + end]).into_owned();
        let per_kernel = [
            ".text.",
            ".nv.info.",
            ".nv.shared.",
            ".nv.constant0.",
            ".rela.text.",
        ]
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
            && !name.starts_with(".nv.shared.reserved");
        if !per_kernel {
            continue;
        }
        let (kind, offset, size) = (u32_at(h + 4), u64_at(h + 0x18), u64_at(h + 0x20));
        const NOBITS: usize = 8;
        let bytes = if kind == NOBITS {
            format!("nobits {size}").into_bytes()
        } else {
            cubin[offset..offset + size].to_vec()
        };
        out.push((name, bytes));
    }
    out
}

/// SHA-256 of each file, by `sha256sum` (one call for all of them).
fn sha256(files: &[PathBuf]) -> HashMap<PathBuf, String> {
    let mut sums = HashMap::new();
    for chunk in files.chunks(2000) {
        let out = std::process::Command::new("sha256sum")
            .args(chunk)
            .output()
            .expect("running sha256sum");
        assert!(out.status.success(), "sha256sum failed");
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let (sum, path) = line.split_once("  ").unwrap();
            sums.insert(PathBuf::from(path), sum.to_string());
        }
    }
    sums
}

/// One variant's line of the manifest: its hashes.
#[derive(Debug, PartialEq)]
struct Entry {
    ptx: String,
    cubin: String,
    sections: BTreeMap<String, String>,
}

fn write_manifest(path: &Path, entries: &BTreeMap<String, Entry>) {
    let mut s = String::from("{\n");
    for (i, (name, e)) in entries.iter().enumerate() {
        let sections: Vec<String> = e
            .sections
            .iter()
            .map(|(k, v)| format!("\"{k}\": \"{v}\""))
            .collect();
        s += &format!(
            "  \"{name}\": {{\"ptx\": \"{}\", \"cubin\": \"{}\", \"sections\": {{{}}}}}{}\n",
            e.ptx,
            e.cubin,
            sections.join(", "),
            if i + 1 < entries.len() { "," } else { "" }
        );
    }
    s += "}\n";
    std::fs::write(path, s).unwrap();
}

/// Reads a manifest written by [`write_manifest`] (one variant per line).
fn read_manifest(path: &Path) -> BTreeMap<String, Entry> {
    let text = std::fs::read_to_string(path).unwrap();
    let quoted =
        |s: &str| -> Vec<String> { s.split('"').skip(1).step_by(2).map(String::from).collect() };
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("  \"")) {
        let q = quoted(line);
        let mut sections = BTreeMap::new();
        for pair in q[6..].chunks(2) {
            sections.insert(pair[0].clone(), pair[1].clone());
        }
        out.insert(
            q[0].clone(),
            Entry {
                ptx: q[2].clone(),
                cubin: q[4].clone(),
                sections,
            },
        );
    }
    out
}

/// Prints how `after` compares with `before`, variant by variant; returns the number of
/// variants whose cubins are identical.
fn compare(before: &BTreeMap<String, Entry>, after: &BTreeMap<String, Entry>) -> usize {
    let (mut same, mut ptx_same, mut kernels_same, mut differ) = (0, 0, 0, 0);
    for (name, a) in after {
        let Some(b) = before.get(name) else {
            println!("NEW       {name}");
            continue;
        };
        if a.ptx == b.ptx {
            ptx_same += 1;
        }
        if a.cubin == b.cubin {
            same += 1;
            continue;
        }
        // The kernels present in both: are their sections the same?
        let common: Vec<&String> = a
            .sections
            .keys()
            .filter(|k| b.sections.contains_key(*k))
            .collect();
        let changed: Vec<&&String> = common
            .iter()
            .filter(|k| a.sections[**k] != b.sections[**k])
            .collect();
        let dropped: Vec<&String> = b
            .sections
            .keys()
            .filter(|k| !a.sections.contains_key(*k))
            .collect();
        let added: Vec<&String> = a
            .sections
            .keys()
            .filter(|k| !b.sections.contains_key(*k))
            .collect();
        if changed.is_empty() && added.is_empty() {
            kernels_same += 1;
            println!(
                "KERNELS=  {name} (cubin differs; kept sections identical; dropped {dropped:?})"
            );
        } else {
            differ += 1;
            println!("DIFFERS   {name} changed {changed:?} added {added:?} dropped {dropped:?}");
        }
    }
    for name in before.keys().filter(|n| !after.contains_key(*n)) {
        println!("GONE      {name}");
    }
    println!(
        "{} variants: {same} identical cubins, {kernels_same} with every kept kernel's sections \
         identical, {differ} differing; {ptx_same} identical PTX",
        after.len()
    );
    same
}

#[test]
#[ignore = "needs NVRTC; writes the manifest named by ROTQ_CUBINS"]
fn cubins() {
    let Some(manifest) = std::env::var_os("ROTQ_CUBINS").map(PathBuf::from) else {
        panic!("set ROTQ_CUBINS to the manifest to write");
    };
    let dir = PathBuf::from(format!("{}.d", manifest.display()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut variants = variants();
    if let Ok(only) = std::env::var("ROTQ_CUBINS_ONLY") {
        variants.retain(|v| v.name.contains(&only));
    }
    // One compile per distinct source.
    let mut sources: Vec<&str> = variants.iter().map(|v| v.source.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    let jobs: usize = std::env::var("ROTQ_CUBINS_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(2);
    println!(
        "{} variants, {} distinct modules, {jobs} jobs",
        variants.len(),
        sources.len()
    );
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: std::sync::Mutex<HashMap<&str, usize>> = Default::default();
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(src) = sources.get(i) else { break };
                let (ptx, cubin) = compile(src).unwrap_or_else(|e| panic!("module {i}: {e}"));
                std::fs::write(dir.join(format!("m{i}.cu")), src).unwrap();
                std::fs::write(dir.join(format!("m{i}.ptx")), &ptx).unwrap();
                std::fs::write(dir.join(format!("m{i}.cubin")), &cubin).unwrap();
                for (name, bytes) in kernel_sections(&cubin) {
                    std::fs::write(dir.join(format!("m{i}.sec{name}")), bytes).unwrap();
                }
                done.lock().unwrap().insert(src, i);
                if i.is_multiple_of(25) {
                    println!("  {i} modules in {:.0} s", started.elapsed().as_secs_f64());
                }
            });
        }
    });
    let done = done.into_inner().unwrap();
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let sums = sha256(&files);
    let mut entries = BTreeMap::new();
    for v in &variants {
        let i = done[v.source.as_str()];
        let sum = |f: String| sums[&dir.join(f)].clone();
        let prefix = format!("m{i}.sec");
        let sections = files
            .iter()
            .filter_map(|f| {
                f.file_name()?
                    .to_str()?
                    .strip_prefix(&prefix)
                    .map(String::from)
            })
            .map(|sec| (sec.clone(), sum(format!("{prefix}{sec}"))))
            .collect();
        entries.insert(
            v.name.clone(),
            Entry {
                ptx: sum(format!("m{i}.ptx")),
                cubin: sum(format!("m{i}.cubin")),
                sections,
            },
        );
    }
    write_manifest(&manifest, &entries);
    assert_eq!(read_manifest(&manifest), entries);
    println!(
        "wrote {} ({} variants) in {:.0} s",
        manifest.display(),
        entries.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(before) = std::env::var_os("ROTQ_CUBINS_BEFORE") {
        compare(&read_manifest(Path::new(&before)), &entries);
    }
}

#[test]
#[ignore = "compares the manifests named by ROTQ_CUBINS_BEFORE and ROTQ_CUBINS"]
fn cubins_compare() {
    let path = |var: &str| -> PathBuf {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("set {var}"))
    };
    let (before, after) = (path("ROTQ_CUBINS_BEFORE"), path("ROTQ_CUBINS"));
    compare(&read_manifest(&before), &read_manifest(&after));
}
