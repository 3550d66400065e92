//! The C ABI v2's bad calls: null pointers, structs shorter than ABI 2.0's, unknown kinds,
//! rotations that do not fit, malformed tables, slot mappings, masks and buffer lengths,
//! buffers that overlap. Each is a status and a message found before any work, the engine's
//! pool bytes (and output buffers) unchanged. And what the calls promise beside: a longer
//! struct (a later minor version's) is read up to the fields rotq knows, a plan serves every
//! codec of its layout, and threads share a codec and a plan.

mod common;
use common::last_error;

use rotq_capi::*;
use std::ffi::{c_char, CStr, CString};
use std::ptr::{null, null_mut};

const H_KV: usize = 2;
const H_Q: usize = 4;
const D: usize = 64;
const PT: usize = 4;
const NP: usize = 8;

fn rotation(qk: u32, v: u32) -> RotqRotation {
    RotqRotation {
        qk,
        v,
        ..RotqRotation::default()
    }
}

fn spec(rotation: *const RotqRotation) -> RotqPoolSpec {
    RotqPoolSpec {
        struct_size: size_of::<RotqPoolSpec>(),
        k_format: c"q8_0".as_ptr(),
        v_format: c"q4_0".as_ptr(),
        rotation,
        n_kv_heads: H_KV,
        head_dim: D,
        v_dim: D,
        n_pages: NP,
        page_tokens: PT,
        query: std::ptr::null(),
    }
}

/// A codec and one layer's pools; the codec freed on drop when the layer made it.
struct Layer {
    codec: *mut RotqCodec,
    owned: bool,
    k: Vec<u8>,
    v: Vec<u8>,
}

impl Layer {
    fn new(spec: &RotqPoolSpec) -> Self {
        let (mut kb, mut vb) = (0, 0);
        let mut codec = null_mut();
        // SAFETY: a valid spec and out pointers.
        unsafe {
            assert_eq!(rotq_pool_bytes(spec, &mut kb, &mut vb), RotqStatus::Ok);
            assert_eq!(
                rotq_codec_new(spec, &mut codec),
                RotqStatus::Ok,
                "{}",
                last_error()
            );
        }
        Self {
            codec,
            owned: true,
            k: vec![0; kb],
            v: vec![0; vb],
        }
    }

    /// Appends `n` tokens of rows made from `seed` into `slots`.
    fn append(&mut self, slots: &[i64], seed: f32) -> RotqStatus {
        let rows = rows(slots.len() * H_KV * D, seed);
        // SAFETY: a live codec, pools of their lengths, rows and slots of `slots.len()` tokens.
        unsafe {
            rotq_pool_append(
                self.codec,
                self.k.as_mut_ptr(),
                self.k.len(),
                self.v.as_mut_ptr(),
                self.v.len(),
                rows.as_ptr(),
                rows.as_ptr(),
                slots.len(),
                slots.as_ptr(),
            )
        }
    }

    fn plan(&self, batch: &RotqBatch) -> (RotqStatus, *mut RotqPlan) {
        let mut plan = null_mut();
        // SAFETY: a live codec, a batch whose arrays are as long as it says, pools of their
        // lengths.
        let status = unsafe {
            rotq_plan_new(
                self.codec,
                batch,
                self.k.as_ptr(),
                self.k.len(),
                self.v.as_ptr(),
                self.v.len(),
                &mut plan,
            )
        };
        (status, plan)
    }

    /// Runs `plan` with buffers of the plan's sizes; the output and LSE.
    fn run(&self, plan: *const RotqPlan, batch: &RotqBatch, q: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (ws, out, lse) = sizes(plan);
        let (mut w, mut o, mut l) = (vec![0f32; ws], vec![0f32; out], vec![0f32; lse]);
        // SAFETY: live handles, buffers of the lengths given.
        let status = unsafe {
            rotq_attention_run(
                self.codec,
                plan,
                batch,
                self.k.as_ptr(),
                self.k.len(),
                self.v.as_ptr(),
                self.v.len(),
                q.as_ptr(),
                w.as_mut_ptr(),
                ws,
                o.as_mut_ptr(),
                out,
                l.as_mut_ptr(),
                lse,
            )
        };
        assert_eq!(status, RotqStatus::Ok, "{}", last_error());
        (o, l)
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: a live handle this layer made, freed once.
            unsafe { rotq_codec_free(self.codec) };
        }
    }
}

fn rows(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
}

fn sizes(plan: *const RotqPlan) -> (usize, usize, usize) {
    let (mut ws, mut out, mut lse) = (0, 0, 0);
    // SAFETY: a live plan, valid out pointers.
    let status = unsafe { rotq_plan_sizes(plan, &mut ws, &mut out, &mut lse) };
    assert_eq!(status, RotqStatus::Ok);
    (ws, out, lse)
}

/// The tables of a batch: two sequences of 6 and 3 tokens in pages [5, 1] and [3], 2 query
/// rows and 1.
struct Tables {
    loc: Vec<u32>,
    table: Vec<i32>,
    lens: Vec<u32>,
    indptr: Vec<u32>,
    indices: Vec<u32>,
    last: Vec<u32>,
}

impl Tables {
    fn new() -> Self {
        Self {
            loc: vec![0, 2, 3],
            table: vec![5, 1, 3, -1],
            lens: vec![6, 3],
            indptr: vec![0, 2, 3],
            indices: vec![5, 1, 3],
            last: vec![2, 3],
        }
    }

    fn block(&self) -> RotqBatch {
        RotqBatch {
            n_seqs: 2,
            query_start_loc: self.loc.as_ptr(),
            h_q: H_Q,
            tables: ROTQ_TABLES_BLOCK,
            block_table: self.table.as_ptr(),
            max_blocks: 2,
            seq_lens: self.lens.as_ptr(),
            ..RotqBatch::default()
        }
    }

    fn csr(&self) -> RotqBatch {
        RotqBatch {
            n_seqs: 2,
            query_start_loc: self.loc.as_ptr(),
            h_q: H_Q,
            tables: ROTQ_TABLES_CSR,
            indptr: self.indptr.as_ptr(),
            indices: self.indices.as_ptr(),
            n_indices: self.indices.len(),
            last_page_len: self.last.as_ptr(),
            ..RotqBatch::default()
        }
    }
}

/// The slots of the two sequences' tokens.
const SLOTS: [i64; 9] = [20, 21, 22, 23, 4, 5, 12, 13, 14];

fn filled_layer(rot: &RotqRotation, seed: f32) -> Layer {
    let mut layer = Layer::new(&spec(rot));
    assert_eq!(
        layer.append(&SLOTS, seed),
        RotqStatus::Ok,
        "{}",
        last_error()
    );
    layer
}

fn expect(status: RotqStatus, want: RotqStatus, says: &str) {
    assert_eq!(status, want, "{}", last_error());
    assert!(
        last_error().contains(says),
        "the message \"{}\" lacks \"{says}\"",
        last_error()
    );
}

#[test]
fn the_abi_version_is_2_4() {
    assert_eq!(rotq_abi_version(), ROTQ_ABI_VERSION);
    assert_eq!(ROTQ_ABI_VERSION, (2 << 16) | 4);
    assert_eq!(rotq_abi_version() >> 16, ROTQ_ABI_VERSION_MAJOR);
    // 2.4 appended the mask to the device structs: 2.3's are their prefixes (read as such).
    use std::mem::{offset_of, size_of};
    assert_eq!(
        offset_of!(RotqDeviceShape, mask_stride) + 8,
        size_of::<RotqDeviceShape>()
    );
    assert_eq!(
        offset_of!(RotqDeviceBatch, mask) + 16,
        size_of::<RotqDeviceBatch>()
    );
    // (The sizes of 2.3, as compiled C programs have them on 64-bit targets.)
    assert_eq!(offset_of!(RotqDeviceShape, mask_stride), 112);
    assert_eq!(offset_of!(RotqDeviceBatch, mask), 64);
}

#[test]
fn pool_bytes_are_the_layouts() {
    let rot = rotation(ROTQ_QK_NONE, ROTQ_V_NONE);
    let (mut kb, mut vb) = (0, 0);
    // SAFETY: (every call below) valid or deliberately null pointers.
    unsafe {
        assert_eq!(
            rotq_pool_bytes(&spec(&rot), &mut kb, &mut vb),
            RotqStatus::Ok
        );
        assert_eq!((kb, vb), (NP * PT * H_KV * 2 * 34, NP * PT * H_KV * 2 * 18));
        // The rotation is not read: an unknown kind does not matter here.
        let odd = rotation(77, 77);
        assert_eq!(
            rotq_pool_bytes(&spec(&odd), &mut kb, &mut vb),
            RotqStatus::Ok
        );
        expect(
            rotq_pool_bytes(null(), &mut kb, &mut vb),
            RotqStatus::InvalidArgument,
            "spec is null",
        );
        expect(
            rotq_pool_bytes(&spec(&rot), null_mut(), &mut vb),
            RotqStatus::InvalidArgument,
            "null",
        );
        let bad = RotqPoolSpec {
            k_format: c"q3_k".as_ptr(),
            ..spec(&rot)
        };
        expect(
            rotq_pool_bytes(&bad, &mut kb, &mut vb),
            RotqStatus::Error,
            "q3_k",
        );
        let huge = RotqPoolSpec {
            n_pages: usize::MAX / 2,
            ..spec(&rot)
        };
        assert_eq!(rotq_pool_bytes(&huge, &mut kb, &mut vb), RotqStatus::Error);
    }
}

#[test]
fn structs_shorter_than_abi_2_0_are_refused_longer_ones_read() {
    let rot = rotation(ROTQ_QK_HADAMARD, ROTQ_V_NONE);
    let mut codec = null_mut();
    // SAFETY: (every call below) valid pointers; each struct is at least as long as its
    // struct_size says.
    unsafe {
        // ABI 2.0's spec ended before `query` (2.1): 8 bytes less than that is refused.
        let short = RotqPoolSpec {
            struct_size: std::mem::offset_of!(RotqPoolSpec, query) - 8,
            ..spec(&rot)
        };
        expect(
            rotq_codec_new(&short, &mut codec),
            RotqStatus::InvalidArgument,
            "spec->struct_size is 64, smaller than the 72 bytes of a RotqPoolSpec of ABI 2.0",
        );
        let (mut kb, mut vb) = (0, 0);
        expect(
            rotq_pool_bytes(&short, &mut kb, &mut vb),
            RotqStatus::InvalidArgument,
            "struct_size",
        );
        let zero = RotqRotation {
            struct_size: 0,
            ..rot
        };
        expect(
            rotq_codec_new(&spec(&zero), &mut codec),
            RotqStatus::InvalidArgument,
            "sizeof(struct RotqRotation)",
        );
        assert!(codec.is_null());

        // A later minor version's structs: fields appended, struct_size larger. Read up to
        // the fields 2.0 knows.
        #[repr(C)]
        struct Later<T> {
            known: T,
            appended: [u64; 4],
        }
        let rot21 = Later {
            known: RotqRotation {
                struct_size: size_of::<Later<RotqRotation>>(),
                ..rot
            },
            appended: [u64::MAX; 4],
        };
        let spec21 = Later {
            known: RotqPoolSpec {
                struct_size: size_of::<Later<RotqPoolSpec>>(),
                ..spec(&rot21.known)
            },
            appended: [7; 4],
        };
        assert_eq!(
            rotq_codec_new(&spec21.known, &mut codec),
            RotqStatus::Ok,
            "{}",
            last_error()
        );
        let mut layer = Layer {
            codec,
            owned: true,
            k: vec![0; NP * PT * H_KV * 2 * 34],
            v: vec![0; NP * PT * H_KV * 2 * 18],
        };
        assert_eq!(layer.append(&SLOTS, 0.0), RotqStatus::Ok);
        let t = Tables::new();
        let batch = Later {
            known: RotqBatch {
                struct_size: size_of::<Later<RotqBatch>>(),
                ..t.block()
            },
            appended: [9; 4],
        };
        let (status, plan) = layer.plan(&batch.known);
        assert_eq!(status, RotqStatus::Ok, "{}", last_error());
        let short = RotqBatch {
            struct_size: 8,
            ..t.block()
        };
        let (status, none) = layer.plan(&short);
        expect(
            status,
            RotqStatus::InvalidArgument,
            "batch->struct_size is 8",
        );
        assert!(none.is_null());
        rotq_plan_free(plan);
    }
}

#[test]
fn rotations_that_do_not_fit_are_refused() {
    let mut m = vec![0f64; D * D];
    for i in 0..D {
        m[i * D + (i + 1) % D] = 1.0; // a cyclic permutation: orthogonal
    }
    let m32: Vec<f32> = m.iter().map(|&x| x as f32).collect();
    let scaled: Vec<f64> = m.iter().map(|&x| 1.5 * x).collect();
    let cases: Vec<(RotqRotation, RotqStatus, &str)> = vec![
        (
            rotation(9, ROTQ_V_NONE),
            RotqStatus::InvalidArgument,
            "rotation->qk 9",
        ),
        (
            rotation(ROTQ_QK_NONE, 7),
            RotqStatus::InvalidArgument,
            "rotation->v 7",
        ),
        (
            RotqRotation {
                qk_block: 48,
                ..rotation(ROTQ_QK_BLOCK_HADAMARD, ROTQ_V_NONE)
            },
            RotqStatus::Error,
            "48",
        ),
        (
            rotation(ROTQ_QK_BLOCK_HADAMARD, ROTQ_V_NONE),
            RotqStatus::Error,
            "block",
        ),
        (
            RotqRotation {
                v_block: 128,
                ..rotation(ROTQ_QK_NONE, ROTQ_V_BLOCK_HADAMARD)
            },
            RotqStatus::Error,
            "128",
        ),
        (
            rotation(ROTQ_QK_MATRIX, ROTQ_V_NONE),
            RotqStatus::InvalidArgument,
            "exactly one of matrix_f64 and matrix_f32",
        ),
        (
            RotqRotation {
                matrix_f64: m.as_ptr(),
                matrix_f32: m32.as_ptr(),
                ..rotation(ROTQ_QK_MATRIX, ROTQ_V_NONE)
            },
            RotqStatus::InvalidArgument,
            "exactly one",
        ),
        (
            RotqRotation {
                matrix_f64: scaled.as_ptr(),
                ..rotation(ROTQ_QK_MATRIX, ROTQ_V_NONE)
            },
            RotqStatus::Error,
            "orthogonal",
        ),
    ];
    for (rot, status, says) in &cases {
        let mut codec = null_mut::<RotqCodec>();
        // SAFETY: valid spec and out pointers; the matrices hold D² values.
        expect(
            unsafe { rotq_codec_new(&spec(rot), &mut codec) },
            *status,
            says,
        );
        assert!(codec.is_null());
    }
    for good in [
        RotqRotation {
            matrix_f64: m.as_ptr(),
            ..rotation(ROTQ_QK_MATRIX, ROTQ_V_HADAMARD)
        },
        RotqRotation {
            matrix_f32: m32.as_ptr(),
            ..rotation(ROTQ_QK_MATRIX, ROTQ_V_NONE)
        },
        RotqRotation {
            seed: 3,
            ..rotation(ROTQ_QK_RANDOMIZED, ROTQ_V_DEFAULT)
        },
    ] {
        drop(Layer::new(&spec(&good)));
    }
    // A spec the kernels cannot hold: q8_0 rows of 60 values, no heads, pages of no tokens.
    let none = rotation(ROTQ_QK_NONE, ROTQ_V_NONE);
    for bad in [
        RotqPoolSpec {
            head_dim: 60,
            ..spec(&none)
        },
        RotqPoolSpec {
            n_kv_heads: 0,
            ..spec(&none)
        },
        RotqPoolSpec {
            page_tokens: 0,
            ..spec(&none)
        },
        RotqPoolSpec {
            n_pages: usize::MAX / 4,
            ..spec(&none)
        },
    ] {
        let mut codec = null_mut::<RotqCodec>();
        // SAFETY: valid spec and out pointers.
        let status = unsafe { rotq_codec_new(&bad, &mut codec) };
        assert_eq!(status, RotqStatus::Error, "{bad:?}");
        assert!(!last_error().is_empty() && codec.is_null());
    }
    // SAFETY: a valid spec, a null out pointer.
    let status = unsafe { rotq_codec_new(&spec(&none), null_mut()) };
    expect(status, RotqStatus::InvalidArgument, "out is null");
}

#[test]
fn bad_appends_are_refused_and_change_no_byte() {
    let rot = rotation(ROTQ_QK_HADAMARD, ROTQ_V_NONE);
    let mut layer = filled_layer(&rot, 0.5);
    let (k0, v0) = (layer.k.clone(), layer.v.clone());
    for (slots, says) in [
        (vec![0, 1, 32], "outside the pool's 32 slots"),
        (vec![0, -2], "-2"),
        (vec![3, 9, 3], "slot 3 is named twice"),
    ] {
        expect(layer.append(&slots, 1.0), RotqStatus::Error, says);
        assert!(layer.k == k0 && layer.v == v0, "{says}");
    }
    let rows = rows(2 * H_KV * D, 2.0);
    let slots = [6i64, 7];
    let c = layer.codec;
    let (kl, vl) = (layer.k.len(), layer.v.len());
    let (kp, vp) = (layer.k.as_mut_ptr(), layer.v.as_mut_ptr());
    // SAFETY: (every call below) a live codec; each buffer is as long as passed, or
    // deliberately null, short or overlapping.
    unsafe {
        expect(
            rotq_pool_append(
                c,
                kp,
                kl - 1,
                vp,
                vl,
                rows.as_ptr(),
                rows.as_ptr(),
                2,
                slots.as_ptr(),
            ),
            RotqStatus::InvalidArgument,
            "k_len is",
        );
        expect(
            rotq_pool_append(
                c,
                kp,
                kl,
                vp,
                vl + 34,
                rows.as_ptr(),
                rows.as_ptr(),
                2,
                slots.as_ptr(),
            ),
            RotqStatus::InvalidArgument,
            "v_len is",
        );
        expect(
            rotq_pool_append(
                c,
                null_mut(),
                kl,
                vp,
                vl,
                rows.as_ptr(),
                rows.as_ptr(),
                2,
                slots.as_ptr(),
            ),
            RotqStatus::InvalidArgument,
            "k_pool is null",
        );
        expect(
            rotq_pool_append(c, kp, kl, vp, vl, null(), rows.as_ptr(), 2, slots.as_ptr()),
            RotqStatus::InvalidArgument,
            "k is null",
        );
        expect(
            rotq_pool_append(c, kp, kl, vp, vl, rows.as_ptr(), rows.as_ptr(), 2, null()),
            RotqStatus::InvalidArgument,
            "slot_mapping is null",
        );
        expect(
            rotq_pool_append(
                null(),
                kp,
                kl,
                vp,
                vl,
                rows.as_ptr(),
                rows.as_ptr(),
                2,
                slots.as_ptr(),
            ),
            RotqStatus::InvalidArgument,
            "codec is null",
        );
        expect(
            rotq_pool_append(
                c,
                kp,
                kl,
                vp,
                vl,
                rows.as_ptr(),
                rows.as_ptr(),
                usize::MAX,
                slots.as_ptr(),
            ),
            RotqStatus::InvalidArgument,
            "overflows",
        );
        // The keys read from the K pool being written.
        expect(
            rotq_pool_append(
                c,
                kp,
                kl,
                vp,
                vl,
                kp.cast(),
                rows.as_ptr(),
                2,
                slots.as_ptr(),
            ),
            RotqStatus::InvalidArgument,
            "k_pool overlaps k",
        );
        // The V pool inside the K pool.
        expect(
            rotq_pool_append(
                c,
                kp,
                kl,
                kp.add(8),
                vl,
                rows.as_ptr(),
                rows.as_ptr(),
                2,
                slots.as_ptr(),
            ),
            RotqStatus::InvalidArgument,
            "k_pool overlaps v_pool",
        );
        assert!(layer.k == k0 && layer.v == v0);
        // Nothing to append, and padding only: nothing written, no error.
        assert_eq!(
            rotq_pool_append(c, kp, kl, vp, vl, null(), null(), 0, null()),
            RotqStatus::Ok
        );
        assert_eq!(last_error(), "");
    }
    assert_eq!(layer.append(&[-1, -1], 3.0), RotqStatus::Ok);
    assert!(layer.k == k0 && layer.v == v0);
}

#[test]
fn bad_shifts_are_refused_and_change_no_byte() {
    let rot = rotation(ROTQ_QK_RANDOMIZED, ROTQ_V_NONE);
    let mut layer = filled_layer(&rot, 0.25);
    let k0 = layer.k.clone();
    let rope = RotqRope {
        neox: 0,
        dims: 0,
        freq_base: 0.0,
        freq_scale: 0.0,
    };
    let c = layer.codec;
    let (kp, kl) = (layer.k.as_mut_ptr(), layer.k.len());
    let ok = [20i64, -1, 4];
    // SAFETY: (every call below) a live codec; buffers as long as passed, or deliberately
    // null or short.
    unsafe {
        expect(
            rotq_pool_shift(c, kp, kl, [20i64, 32].as_ptr(), 2, 1, &rope),
            RotqStatus::Error,
            "slots[1] = 32 is outside the pool's 32 slots",
        );
        expect(
            rotq_pool_shift(c, kp, kl, [5i64, 4, 5].as_ptr(), 3, 1, &rope),
            RotqStatus::Error,
            "slot 5 is named twice",
        );
        expect(
            rotq_pool_shift(c, kp, kl, [-3i64].as_ptr(), 1, 1, &rope),
            RotqStatus::Error,
            "-3",
        );
        expect(
            rotq_pool_shift(c, kp, kl, ok.as_ptr(), 3, 1, &RotqRope { neox: 2, ..rope }),
            RotqStatus::InvalidArgument,
            "rope.neox 2",
        );
        expect(
            rotq_pool_shift(c, kp, kl, ok.as_ptr(), 3, 1, &RotqRope { dims: 33, ..rope }),
            RotqStatus::Error,
            "33",
        );
        expect(
            rotq_pool_shift(
                c,
                kp,
                kl,
                ok.as_ptr(),
                3,
                1,
                &RotqRope {
                    freq_base: -1.0,
                    ..rope
                },
            ),
            RotqStatus::Error,
            "freq_base",
        );
        expect(
            rotq_pool_shift(c, kp, kl, ok.as_ptr(), 3, 1, null()),
            RotqStatus::InvalidArgument,
            "rope is null",
        );
        expect(
            rotq_pool_shift(c, kp, kl + 1, ok.as_ptr(), 3, 1, &rope),
            RotqStatus::InvalidArgument,
            "k_len is",
        );
        expect(
            rotq_pool_shift(c, kp, kl, kp.cast(), 3, 1, &rope),
            RotqStatus::InvalidArgument,
            "k_pool overlaps slots",
        );
        assert!(layer.k == k0);
        assert_eq!(
            rotq_pool_shift(c, kp, kl, ok.as_ptr(), 3, 5, &rope),
            RotqStatus::Ok
        );
    }
    // Slots 20 and 4 moved; the others did not.
    let tb = H_KV * 2 * 34;
    for s in 0..NP * PT {
        let same = layer.k[s * tb..(s + 1) * tb] == k0[s * tb..(s + 1) * tb];
        assert_eq!(same, s != 20 && s != 4, "slot {s}");
    }
}

#[test]
fn bad_batches_are_refused_when_planned() {
    let rot = rotation(ROTQ_QK_HADAMARD, ROTQ_V_NONE);
    let layer = filled_layer(&rot, 0.0);
    let t = Tables::new();
    for good in [t.block(), t.csr()] {
        let (status, plan) = layer.plan(&good);
        assert_eq!(status, RotqStatus::Ok, "{}", last_error());
        // SAFETY: a live plan, freed once.
        unsafe { rotq_plan_free(plan) };
    }
    let page_outside = [5i32, 1, 8, -1];
    let page_twice = [5i32, 5, 3, -1];
    let negative = [5i32, -1, 3, -1];
    let long = [9u32, 3];
    let loc_from_1 = [1u32, 2, 3];
    let loc_down = [0u32, 2, 1];
    let too_many_rows = [0u32, 2, 6];
    let indptr_down = [0u32, 2, 1];
    let indptr_past = [0u32, 2, 4];
    let last_zero = [2u32, 0];
    let last_big = [2u32, 5];
    let short_loc = [0u32];
    let mask = [0f32; 3 * 6];
    let positions = [0u32, 1];
    let cases: Vec<(RotqBatch, RotqStatus, &str)> = vec![
        (
            RotqBatch {
                block_table: page_outside.as_ptr(),
                ..t.block()
            },
            RotqStatus::Error,
            "page 8, outside the pool's 8 pages",
        ),
        (
            RotqBatch {
                block_table: page_twice.as_ptr(),
                ..t.block()
            },
            RotqStatus::Error,
            "uses page 5 twice",
        ),
        (
            RotqBatch {
                block_table: negative.as_ptr(),
                ..t.block()
            },
            RotqStatus::Error,
            "below 0",
        ),
        (
            RotqBatch {
                seq_lens: long.as_ptr(),
                ..t.block()
            },
            RotqStatus::Error,
            "more than the table's 2 columns",
        ),
        (
            RotqBatch {
                query_start_loc: loc_from_1.as_ptr(),
                ..t.block()
            },
            RotqStatus::Error,
            "must start at 0",
        ),
        (
            RotqBatch {
                query_start_loc: loc_down.as_ptr(),
                ..t.block()
            },
            RotqStatus::Error,
            "never decrease",
        ),
        (
            RotqBatch {
                query_start_loc: too_many_rows.as_ptr(),
                ..t.block()
            },
            RotqStatus::Error,
            "sequence 1 has 4 query rows but 3 tokens",
        ),
        (
            RotqBatch {
                h_q: 3,
                ..t.block()
            },
            RotqStatus::Error,
            "3",
        ),
        (
            RotqBatch {
                h_q: 0,
                ..t.block()
            },
            RotqStatus::Error,
            "",
        ),
        (
            RotqBatch {
                tables: 0,
                ..t.block()
            },
            RotqStatus::InvalidArgument,
            "batch->tables 0",
        ),
        (
            RotqBatch {
                block_table: null(),
                ..t.block()
            },
            RotqStatus::InvalidArgument,
            "batch->block_table is null",
        ),
        (
            RotqBatch {
                query_start_loc: null(),
                ..t.block()
            },
            RotqStatus::InvalidArgument,
            "batch->query_start_loc is null",
        ),
        (
            RotqBatch {
                n_seqs: usize::MAX,
                ..t.block()
            },
            RotqStatus::InvalidArgument,
            "overflows",
        ),
        (
            RotqBatch {
                indptr: indptr_down.as_ptr(),
                ..t.csr()
            },
            RotqStatus::Error,
            "indptr",
        ),
        (
            RotqBatch {
                indptr: indptr_past.as_ptr(),
                ..t.csr()
            },
            RotqStatus::Error,
            "within the 3 indices",
        ),
        (
            RotqBatch {
                n_indices: 2,
                ..t.csr()
            },
            RotqStatus::Error,
            "within the 2 indices",
        ),
        (
            RotqBatch {
                last_page_len: last_zero.as_ptr(),
                ..t.csr()
            },
            RotqStatus::Error,
            "holds 0 tokens, not 1 to 4",
        ),
        (
            RotqBatch {
                last_page_len: last_big.as_ptr(),
                ..t.csr()
            },
            RotqStatus::Error,
            "holds 5 tokens",
        ),
        (
            RotqBatch {
                n_seqs: 0,
                query_start_loc: short_loc.as_ptr(),
                indptr: short_loc.as_ptr(),
                ..t.csr()
            },
            RotqStatus::Ok,
            "",
        ),
        (
            RotqBatch {
                mask: mask.as_ptr(),
                mask_row_stride: 5,
                mask_len: mask.len(),
                ..t.block()
            },
            RotqStatus::Error,
            "a row stride of 5 is shorter than the longest sequence (6 tokens)",
        ),
        (
            RotqBatch {
                mask: mask.as_ptr(),
                mask_row_stride: 6,
                mask_len: 17,
                ..t.block()
            },
            RotqStatus::Error,
            "mask values [rows, row_stride]",
        ),
        (
            RotqBatch {
                q_positions: positions.as_ptr(),
                n_seqs: 2,
                ..t.block()
            },
            RotqStatus::Ok,
            "",
        ),
        (
            RotqBatch {
                params: RotqAttentionParams {
                    pos_offset: 3,
                    ..t.block().params
                },
                ..t.block()
            },
            RotqStatus::InvalidArgument,
            "pos_offset",
        ),
        (
            RotqBatch {
                params: RotqAttentionParams {
                    softcap: -1.0,
                    ..t.block().params
                },
                ..t.block()
            },
            RotqStatus::Error,
            "softcap",
        ),
        (
            RotqBatch {
                params: RotqAttentionParams {
                    scale: f64::NAN,
                    ..t.block().params
                },
                ..t.block()
            },
            RotqStatus::Error,
            "scale",
        ),
    ];
    for (i, (batch, status, says)) in cases.iter().enumerate() {
        let (got, plan) = layer.plan(batch);
        assert_eq!(got, *status, "case {i}: {}", last_error());
        expect(got, *status, says);
        assert_eq!(plan.is_null(), *status != RotqStatus::Ok);
        // SAFETY: a live plan or null, freed once.
        unsafe { rotq_plan_free(plan) };
    }
    // A pool of the wrong length, a null batch, no out pointer.
    let mut plan = null_mut();
    // SAFETY: (every call below) a live codec, buffers as long as passed or deliberately
    // short or null.
    unsafe {
        let b = t.block();
        let (k, v) = (layer.k.as_ptr(), layer.v.as_ptr());
        let (kl, vl) = (layer.k.len(), layer.v.len());
        expect(
            rotq_plan_new(layer.codec, &b, k, kl - 34, v, vl, &mut plan),
            RotqStatus::InvalidArgument,
            "k_len is",
        );
        expect(
            rotq_plan_new(layer.codec, null(), k, kl, v, vl, &mut plan),
            RotqStatus::InvalidArgument,
            "batch is null",
        );
        expect(
            rotq_plan_new(layer.codec, &b, k, kl, null(), vl, &mut plan),
            RotqStatus::InvalidArgument,
            "v_pool is null",
        );
        expect(
            rotq_plan_new(layer.codec, &b, k, kl, v, vl, null_mut()),
            RotqStatus::InvalidArgument,
            "plan is null",
        );
        assert!(plan.is_null());
        expect(
            rotq_plan_sizes(null(), null_mut(), null_mut(), null_mut()),
            RotqStatus::InvalidArgument,
            "plan is null",
        );
    }
}

#[test]
fn bad_runs_are_refused_and_write_nothing() {
    let rot = rotation(ROTQ_QK_HADAMARD, ROTQ_V_NONE);
    let layer = filled_layer(&rot, 0.0);
    let t = Tables::new();
    let batch = t.block();
    let (_, plan) = layer.plan(&batch);
    let (ws, out_len, lse_len) = sizes(plan);
    assert_eq!((out_len, lse_len), (3 * H_Q * D, 3 * H_Q));
    let q = rows(3 * H_Q * D, 0.9);
    let (mut w, mut out, mut lse) = (
        vec![0f32; ws + 16],
        vec![7f32; out_len + 1],
        vec![7f32; lse_len + 1],
    );
    let c = layer.codec;
    let (k, v, kl, vl) = (
        layer.k.as_ptr(),
        layer.v.as_ptr(),
        layer.k.len(),
        layer.v.len(),
    );
    // Another batch (sequence 1 one token shorter), and a codec of another layout.
    let other_lens = [6u32, 2];
    let other = RotqBatch {
        seq_lens: other_lens.as_ptr(),
        ..t.block()
    };
    let wider = Layer::new(&RotqPoolSpec {
        n_pages: NP + 1,
        ..spec(&rot)
    });
    let (wo, o, l, qp) = (
        w.as_mut_ptr(),
        out.as_mut_ptr(),
        lse.as_mut_ptr(),
        q.as_ptr(),
    );
    // SAFETY: (every call below) live handles; buffers at least as long as passed, or
    // deliberately null or overlapping.
    unsafe {
        expect(
            rotq_attention_run(
                c,
                plan,
                &batch,
                k,
                kl,
                v,
                vl,
                qp,
                wo,
                ws,
                o,
                out_len + 1,
                l,
                lse_len,
            ),
            RotqStatus::Error,
            "output",
        );
        expect(
            rotq_attention_run(
                c,
                plan,
                &batch,
                k,
                kl,
                v,
                vl,
                qp,
                wo,
                ws,
                o,
                out_len,
                l,
                lse_len - 1,
            ),
            RotqStatus::Error,
            "LSE",
        );
        expect(
            rotq_attention_run(
                c,
                plan,
                &batch,
                k,
                kl,
                v,
                vl,
                qp,
                wo,
                ws - 1,
                o,
                out_len,
                l,
                lse_len,
            ),
            RotqStatus::Error,
            "workspace",
        );
        expect(
            rotq_attention_run(
                c,
                plan,
                &batch,
                k,
                kl,
                v,
                vl,
                null(),
                wo,
                ws,
                o,
                out_len,
                l,
                lse_len,
            ),
            RotqStatus::InvalidArgument,
            "q is null",
        );
        expect(
            rotq_attention_run(
                c,
                plan,
                &batch,
                k,
                kl,
                v,
                vl,
                qp,
                wo,
                ws,
                null_mut(),
                out_len,
                l,
                lse_len,
            ),
            RotqStatus::InvalidArgument,
            "out is null",
        );
        expect(
            rotq_attention_run(
                c,
                plan,
                &batch,
                k,
                kl,
                v,
                vl,
                qp,
                wo,
                ws,
                o,
                out_len,
                null_mut(),
                lse_len,
            ),
            RotqStatus::InvalidArgument,
            "lse is null but lse_len is not 0",
        );
        expect(
            rotq_attention_run(
                c,
                null(),
                &batch,
                k,
                kl,
                v,
                vl,
                qp,
                wo,
                ws,
                o,
                out_len,
                l,
                lse_len,
            ),
            RotqStatus::InvalidArgument,
            "plan is null",
        );
        expect(
            rotq_attention_run(
                c,
                plan,
                &batch,
                k,
                kl,
                v,
                vl - 1,
                qp,
                wo,
                ws,
                o,
                out_len,
                l,
                lse_len,
            ),
            RotqStatus::InvalidArgument,
            "v_len is",
        );
        expect(
            rotq_attention_run(
                c, plan, &other, k, kl, v, vl, qp, wo, ws, o, out_len, l, lse_len,
            ),
            RotqStatus::Error,
            "differ from the ones it was planned for",
        );
        expect(
            rotq_attention_run(
                wider.codec,
                plan,
                &batch,
                wider.k.as_ptr(),
                wider.k.len(),
                wider.v.as_ptr(),
                wider.v.len(),
                qp,
                wo,
                ws,
                o,
                out_len,
                l,
                lse_len,
            ),
            RotqStatus::Error,
            "another layout",
        );
        // The output over the queries, the LSE over the workspace.
        expect(
            rotq_attention_run(
                c, plan, &batch, k, kl, v, vl, o, wo, ws, o, out_len, l, lse_len,
            ),
            RotqStatus::InvalidArgument,
            "out overlaps q",
        );
        expect(
            rotq_attention_run(
                c,
                plan,
                &batch,
                k,
                kl,
                v,
                vl,
                qp,
                wo,
                ws,
                o,
                out_len,
                wo.add(4),
                lse_len,
            ),
            RotqStatus::InvalidArgument,
            "workspace overlaps lse",
        );
    }
    assert!(
        out.iter().chain(&lse).all(|&x| x == 7.0),
        "a failed run wrote its output"
    );
    // SAFETY: a live plan, freed once.
    unsafe { rotq_plan_free(plan) };
}

#[test]
fn a_plan_serves_every_codec_of_its_layout() {
    // Two layers with other rotations (as a checkpoint's per-layer R3 would be) and the same
    // layout: either's plan runs on both, as each one's own plan does.
    let t = Tables::new();
    let batch = t.csr();
    let q = rows(3 * H_Q * D, 0.4);
    let (r0, r1) = (
        rotation(ROTQ_QK_HADAMARD, ROTQ_V_NONE),
        RotqRotation {
            seed: 11,
            ..rotation(ROTQ_QK_RANDOMIZED, ROTQ_V_HADAMARD)
        },
    );
    let (l0, l1) = (filled_layer(&r0, 0.0), filled_layer(&r1, 0.0));
    let (_, p0) = l0.plan(&batch);
    let (_, p1) = l1.plan(&batch);
    assert_eq!(l1.run(p0, &batch, &q), l1.run(p1, &batch, &q));
    assert_eq!(l0.run(p1, &batch, &q), l0.run(p0, &batch, &q));
    // SAFETY: live plans, freed once.
    unsafe {
        rotq_plan_free(p0);
        rotq_plan_free(p1);
    }
}

#[test]
fn threads_share_a_codec_and_a_plan() {
    // 8 threads, one codec and one plan, each its own layer's pools: appends and runs at once
    // give what they give one after the other.
    const THREADS: usize = 8;
    let rot = rotation(ROTQ_QK_HADAMARD, ROTQ_V_BLOCK_HADAMARD);
    let rot = RotqRotation { v_block: 16, ..rot };
    let shared = filled_layer(&rot, 0.0);
    let t = Tables::new();
    let batch = t.block();
    let (_, plan) = shared.plan(&batch);
    let q = rows(3 * H_Q * D, 0.7);
    let alone: Vec<_> = (0..THREADS)
        .map(|i| {
            let mut layer = Layer::new(&spec(&rot));
            assert_eq!(layer.append(&SLOTS, i as f32), RotqStatus::Ok);
            let result = layer.run(plan, &batch, &q);
            (layer.k.clone(), result)
        })
        .collect();
    /// The handles (documented as shared freely) and the batch (read-only arrays).
    struct Shared(*mut RotqCodec, *mut RotqPlan, RotqBatch);
    // SAFETY: the handles may be used from several threads at once (the ABI's promise); the
    // batch's arrays outlive the threads and nothing writes them.
    unsafe impl Sync for Shared {}
    let handles = Shared(shared.codec, plan, batch);
    std::thread::scope(|s| {
        for (i, want) in alone.iter().enumerate() {
            let (handles, q) = (&handles, &q);
            s.spawn(move || {
                for _ in 0..20 {
                    // The shared codec (not freed by this layer), this thread's pools.
                    let mut layer = Layer {
                        codec: handles.0,
                        owned: false,
                        k: vec![0; want.0.len()],
                        v: vec![0; NP * PT * H_KV * 2 * 18],
                    };
                    assert_eq!(layer.append(&SLOTS, i as f32), RotqStatus::Ok);
                    assert!(layer.k == want.0);
                    assert!(layer.run(handles.1, &handles.2, q) == want.1);
                }
            });
        }
    });
    // SAFETY: a live plan, freed once.
    unsafe { rotq_plan_free(plan) };
}

#[test]
fn checkpoint_codecs_say_what_is_wrong() {
    let dir = std::env::temp_dir().join(format!("rotq-abi-v2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        CString::new(path.to_str().unwrap()).unwrap()
    };
    let group_of = |kind: &str, locations: &[&str], head_dim: usize, target: &str| {
        let apply: Vec<String> = locations
            .iter()
            .map(|l| format!(r#"{{"targets": "{target}", "location": "{l}"}}"#))
            .collect();
        format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "quantization_config": {{"transform_config":
            {{"config_groups": {{"R3": {{"type": "{kind}", "head_dim": {head_dim},
            "apply": [{}]}}}}}}}}}}"#,
            apply.join(",")
        )
    };
    let group = |kind: &str, locations: &[&str]| group_of(kind, locations, D, "LlamaAttention");
    let r3 = write("r3.json", &group("hadamard", &["q_attn", "k_cache"]));
    let q_only = write("q_only.json", &group("hadamard", &["q_attn"]));
    let unknown = write("unknown.json", &group("givens", &["q_attn", "k_cache"]));
    let nowhere = write(
        "nowhere.json",
        &group_of("hadamard", &["q_attn", "k_cache"], D, "re:self_attn"),
    );
    let broken = write("broken.json", "{");
    let missing = CString::new(dir.join("none.json").to_str().unwrap()).unwrap();
    let rot = rotation(ROTQ_QK_NONE, ROTQ_V_HADAMARD);
    let s = spec(&rot);
    let mut codecs = [null_mut::<RotqCodec>(); 3];
    let mut from = false;
    // SAFETY: (every call below) NUL-terminated paths, a valid spec, room for 3 handles.
    unsafe {
        assert_eq!(
            rotq_checkpoint_codecs(r3.as_ptr(), null(), &s, 3, codecs.as_mut_ptr(), &mut from),
            RotqStatus::Ok,
            "{}",
            last_error()
        );
        assert!(from && codecs.iter().all(|c| !c.is_null()));
        codecs.iter().for_each(|&c| rotq_codec_free(c));
        for (path, says) in [
            (&q_only, "q_attn and k_cache must both be rotated"),
            (&unknown, "unsupported transform type `givens`"),
            (&nowhere, "matches no module"),
            (&broken, "config.json"),
            (&missing, "none.json"),
        ] {
            codecs = [null_mut(); 3];
            let status = rotq_checkpoint_codecs(
                path.as_ptr(),
                null(),
                &s,
                3,
                codecs.as_mut_ptr(),
                null_mut(),
            );
            expect(status, RotqStatus::Error, says);
            assert!(codecs.iter().all(|c| c.is_null()));
        }
        expect(
            rotq_checkpoint_codecs(null(), null(), &s, 3, codecs.as_mut_ptr(), null_mut()),
            RotqStatus::InvalidArgument,
            "config_json_path is null",
        );
        expect(
            rotq_checkpoint_codecs(r3.as_ptr(), null(), &s, 3, null_mut(), null_mut()),
            RotqStatus::InvalidArgument,
            "codecs is null",
        );
        // The checkpoint's head dim must be the spec's.
        let wide = RotqPoolSpec { head_dim: 128, ..s };
        let sized = write(
            "sized.json",
            &group_of("hadamard", &["q_attn", "k_cache"], 96, "LlamaAttention"),
        );
        expect(
            rotq_checkpoint_codecs(
                sized.as_ptr(),
                null(),
                &wide,
                3,
                codecs.as_mut_ptr(),
                null_mut(),
            ),
            RotqStatus::Error,
            "differs from the model's head dim 128",
        );
        // No layers: nothing to make.
        assert_eq!(
            rotq_checkpoint_codecs(r3.as_ptr(), null(), &s, 0, null_mut(), null_mut()),
            RotqStatus::Ok
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// ABI 2.2's `rotq_checkpoint_plan`: a layer's Q/K rotation from a model folder, "none" for a
/// layer the config's `ignore` leaves out; errors (a layer past the count, a buffer too small,
/// a target that matches nothing) leave the buffer empty and say what is wrong.
#[test]
fn checkpoint_plan_describes_a_layer() {
    let dir = std::env::temp_dir().join(format!("rotq-abi-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = |target: &str| {
        format!(
            r#"{{"quantization_config": {{"transform_config": {{"config_groups": {{"R3": {{
            "type": "hadamard", "head_dim": 32, "apply": [
            {{"targets": "{target}", "ignore": "re:model\\.layers\\.0\\.", "location": "q_attn"}},
            {{"targets": "{target}", "ignore": "re:model\\.layers\\.0\\.", "location": "k_cache"}}
            ]}}}}}}}}}}"#
        )
    };
    std::fs::write(dir.join("config.json"), config("re:.*self_attn$")).unwrap();
    let path = CString::new(dir.to_str().unwrap()).unwrap();
    let describe = |layer: usize, len: usize| -> (RotqStatus, String) {
        let mut out = vec![b'x' as c_char; len];
        // SAFETY: a NUL-terminated path and `len` writable bytes.
        let status =
            unsafe { rotq_checkpoint_plan(path.as_ptr(), 3, 64, layer, out.as_mut_ptr(), len) };
        // SAFETY: the call leaves a NUL-terminated string (empty on error).
        let text = unsafe { CStr::from_ptr(out.as_ptr()) };
        (status, text.to_str().unwrap().to_string())
    };
    assert_eq!(
        describe(0, 64),
        (RotqStatus::Ok, "none".to_string()),
        "{}",
        last_error()
    );
    assert_eq!(
        describe(2, 64),
        (RotqStatus::Ok, "block-hadamard(64, block 32)".to_string())
    );
    let (status, text) = describe(3, 64);
    assert_eq!((status, text.as_str()), (RotqStatus::InvalidArgument, ""));
    assert!(last_error().contains("layer 3 of 3"), "{}", last_error());
    let (status, text) = describe(1, 8);
    assert_eq!((status, text.as_str()), (RotqStatus::InvalidArgument, ""));
    assert!(last_error().contains("needs 29"), "{}", last_error());
    std::fs::write(dir.join("config.json"), config("re:attn")).unwrap();
    let (status, _) = describe(1, 64);
    assert_eq!(status, RotqStatus::Error);
    assert!(
        last_error().contains("matches no module"),
        "{}",
        last_error()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// ABI 2.1's `query`: a 2.0-sized spec (no such field) and null both mean "auto"; "exact" and
/// "q8_0" pick the arithmetic (the outputs differ where "auto" quantizes: rotated q8_0 K); a
/// name that is none of these is refused, naming the field.
#[test]
fn the_query_mode_is_read_from_2_1_specs_and_defaults_for_2_0() {
    let rot = rotation(ROTQ_QK_HADAMARD, ROTQ_V_NONE);
    let run = |spec: &RotqPoolSpec| -> Result<Vec<f32>, String> {
        let mut codec = null_mut();
        // SAFETY: a valid spec (its names NUL-terminated) and out pointer.
        if unsafe { rotq_codec_new(spec, &mut codec) } != RotqStatus::Ok {
            return Err(last_error());
        }
        // SAFETY: a live codec, made above and not used after.
        unsafe { rotq_codec_free(codec) };
        let mut layer = Layer::new(spec);
        assert_eq!(
            layer.append(&SLOTS, 0.25),
            RotqStatus::Ok,
            "{}",
            last_error()
        );
        let t = Tables::new();
        let batch = t.block();
        let (status, plan) = layer.plan(&batch);
        assert_eq!(status, RotqStatus::Ok, "{}", last_error());
        let (out, _) = layer.run(plan, &batch, &rows(3 * H_Q * D, 0.6));
        // SAFETY: a live plan, not used after.
        unsafe { rotq_plan_free(plan) };
        Ok(out)
    };
    let with = |query: *const std::ffi::c_char| RotqPoolSpec {
        query,
        ..spec(&rot)
    };
    let v2_0 = RotqPoolSpec {
        struct_size: std::mem::offset_of!(RotqPoolSpec, query),
        // Past a 2.0 caller's struct: never read.
        query: c"not a mode".as_ptr(),
        ..spec(&rot)
    };
    // A size inside the appended pointer (a 2.0 size plus 4) is refused, never half read.
    let torn = RotqPoolSpec {
        struct_size: std::mem::offset_of!(RotqPoolSpec, query) + 4,
        query: c"exact".as_ptr(),
        ..spec(&rot)
    };
    let err = run(&torn).unwrap_err();
    assert!(err.contains("struct_size"), "{err}");
    let auto = run(&with(null())).unwrap();
    assert_eq!(run(&v2_0).unwrap(), auto);
    assert_eq!(run(&with(c"auto".as_ptr())).unwrap(), auto);
    assert_eq!(run(&with(c"q8_0".as_ptr())).unwrap(), auto);
    assert_ne!(run(&with(c"exact".as_ptr())).unwrap(), auto);
    let err = run(&with(c"q4_0".as_ptr())).unwrap_err();
    assert!(
        err.contains("spec->query") && err.contains("`q4_0`"),
        "{err}"
    );
}

/// ABI 2.3's device calls, where the host can tell: a CPU backend, null handles and struct
/// pointers, a bad element type or tables kind are refused with a message, and no plan is
/// made. (Their runs on a GPU are `capi/examples/device.c`'s.)
#[test]
fn device_calls_refuse_what_the_host_can_tell() {
    let rot = rotation(ROTQ_QK_HADAMARD, ROTQ_V_NONE);
    let layer = Layer::new(&spec(&rot));
    let mut cpu = null_mut();
    // SAFETY: (every call below) valid or deliberately null pointers; handles freed once.
    unsafe {
        assert_eq!(rotq_backend_open(c"cpu".as_ptr(), &mut cpu), RotqStatus::Ok);
        let shape = RotqDeviceShape {
            n_seqs: 2,
            max_rows: 2,
            max_seq_len: 32,
            h_q: H_Q,
            max_blocks: 8,
            ..RotqDeviceShape::default()
        };
        let mut plan = std::ptr::dangling_mut::<RotqDevicePlan>();
        // A program built against 2.3 passes its shorter struct: read as before (the call goes
        // on to the backend); a size between the versions, or below 2.3's, is refused.
        let v2_3 = std::mem::offset_of!(RotqDeviceShape, mask_stride);
        let sized = |struct_size| RotqDeviceShape {
            struct_size,
            ..shape
        };
        let (old, cut, short) = (sized(v2_3), sized(v2_3 + 4), sized(64));
        let cases: [(
            *const RotqBackend,
            *const RotqCodec,
            *const RotqDeviceShape,
            &str,
        ); 6] = [
            (cpu, layer.codec, &shape, "not a CUDA device"),
            (null(), layer.codec, &shape, "backend is null"),
            (cpu, null(), &shape, "codec is null"),
            (cpu, layer.codec, &old, "not a CUDA device"),
            (cpu, layer.codec, &cut, "neither ABI 2.3's 112 bytes"),
            (cpu, layer.codec, &short, "of ABI 2.3"),
        ];
        for (backend, codec, shape, says) in cases {
            let status = rotq_device_plan_new(backend, codec, shape, &mut plan);
            if cfg!(feature = "cuda") {
                expect(status, RotqStatus::InvalidArgument, says);
            } else {
                expect(status, RotqStatus::Error, "without CUDA");
            }
            assert!(plan.is_null());
        }
        expect(
            rotq_device_plan_new(cpu, layer.codec, &shape, null_mut()),
            RotqStatus::InvalidArgument,
            "plan is null",
        );
        let sizes = rotq_device_plan_sizes(null(), null_mut(), null_mut(), null_mut(), null_mut());
        expect(sizes, RotqStatus::InvalidArgument, "plan is null");
        let run = rotq_device_attention_run(
            null(),
            null_mut(),
            null(),
            0,
            null(),
            0,
            null(),
            0,
            null(),
            null_mut(),
            0,
            null_mut(),
            0,
            null_mut(),
            0,
        );
        expect(run, RotqStatus::InvalidArgument, "plan is null");
        rotq_device_plan_free(null_mut());
        let mut dcodec = std::ptr::dangling_mut::<RotqDeviceCodec>();
        let status = rotq_device_codec_new(cpu, layer.codec, &mut dcodec);
        if cfg!(feature = "cuda") {
            expect(status, RotqStatus::InvalidArgument, "not a CUDA device");
        } else {
            expect(status, RotqStatus::Error, "without CUDA");
        }
        assert!(dcodec.is_null());
        let append = rotq_device_pool_append(
            null(),
            null_mut(),
            null(),
            null(),
            null(),
            0,
            null(),
            null_mut(),
            0,
            null_mut(),
            0,
            null_mut(),
        );
        expect(append, RotqStatus::InvalidArgument, "codec is null");
        rotq_device_codec_free(null_mut());
        rotq_backend_free(cpu);
    }
}
