//! vLLM's TurboQuant slots, built here by the rules vLLM's source states (its store kernels
//! `_tq_fused_store_mse`, `_tq_fused_store_fp8`, `_store_quantized_value` and its
//! `solve_lloyd_max`, written out independently of `rotq_reference::turboquant::vllm`), decoded
//! by rotq and compared with rotq's own encoding.

use half::f16;
use rotq_reference::turboquant::sketch_matrix;
use rotq_reference::turboquant::vllm::{codebook, Preset};

const D: usize = 128;

/// vLLM's d = 128 codebooks as its Python solver gives them (f32 bits, ascending), computed
/// apart from rotq from `centroids.py` of the merged PR.
const BOOK3: [u32; 8] = [
    0xbe42a09f, 0xbdf3243d, 0xbd88c955, 0xbcb16317, 0x3cb16317, 0x3d88c955, 0x3df3243d, 0x3e42a09f,
];
const BOOK4: [u32; 16] = [
    0xbe772cc4, 0xbe3b36e7, 0xbe126f17, 0xbde3682b, 0xbdaa99f2, 0xbd6dd0e1, 0xbd0c8559, 0xbc39fbae,
    0x3c39fbae, 0x3d0c8559, 0x3d6dd0e1, 0x3daa99f2, 0x3de3682b, 0x3e126f17, 0x3e3b36e7, 0x3e772cc4,
];

fn book(bits: u32) -> Vec<f32> {
    match bits {
        3 => BOOK3.iter().map(|&b| f32::from_bits(b)).collect(),
        _ => BOOK4.iter().map(|&b| f32::from_bits(b)).collect(),
    }
}

/// The Sylvester Hadamard matrix over √d, f32 (vLLM's `PiT`, symmetric).
fn hadamard_f32() -> Vec<f32> {
    let s = 1.0 / (D as f32).sqrt();
    (0..D * D)
        .map(|i| {
            let (r, c) = (i / D, i % D);
            if (r & c).count_ones() % 2 == 0 {
                s
            } else {
                -s
            }
        })
        .collect()
}

/// E4M3 ("fn": bias 7, no infinities, max 448) written out here apart from rotq's: the nearest
/// of the 127 non-negative codes (ties to the even code), saturating at 448, the sign bit
/// copied; NaN is 0x7F.
fn e4m3(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let value = |c: u8| {
        let (e, m) = (i32::from(c >> 3), f64::from(c & 7));
        if e == 0 {
            m / 512.0
        } else {
            (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    };
    let a = f64::from(v.abs());
    let mut best = 0u8;
    for c in 1..=0x7Eu8 {
        let (dc, db) = ((value(c) - a).abs(), (value(best) - a).abs());
        if dc < db || (dc == db && c % 2 == 0) {
            best = c;
        }
    }
    best | if v.is_sign_negative() { 0x80 } else { 0 }
}

/// Packs codes as vLLM's store kernel: 4-bit pairs into bytes, 3-bit groups of 8 into 24 bits.
fn vllm_pack(codes: &[u8], bits: u32) -> Vec<u8> {
    if bits == 4 {
        codes
            .chunks_exact(2)
            .map(|p| (p[0] & 0xF) | (p[1] & 0xF) << 4)
            .collect()
    } else {
        let mut out = Vec::new();
        for g in codes.chunks_exact(8) {
            let w: u32 = g
                .iter()
                .enumerate()
                .map(|(j, &c)| u32::from(c) << (3 * j))
                .sum();
            out.extend([w as u8, (w >> 8) as u8, (w >> 16) as u8]);
        }
        out
    }
}

/// One slot by vLLM's rules: keys (codebook: f32 norm, `x / (norm + 1e-8)`, `x @ PiT` in f32,
/// binary-search bucketize on f32 midpoints with ties going up; FP8: cast), values (f32 min-max),
/// f16 fields little-endian, an even slot.
fn vllm_slot(p: Preset, key: &[f32], value: &[f32]) -> Vec<u8> {
    let mut slot = Vec::new();
    match p.key_bits() {
        None => slot.extend(key.iter().map(|&k| e4m3(k))),
        Some(bits) => {
            let norm = key.iter().map(|k| k * k).sum::<f32>().sqrt();
            let x: Vec<f32> = key.iter().map(|k| k / (norm + 1e-8)).collect();
            let h = hadamard_f32();
            let c = book(bits);
            let mids: Vec<f32> = c.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
            let codes: Vec<u8> = (0..D)
                .map(|j| {
                    let y: f32 = (0..D).map(|i| x[i] * h[i * D + j]).sum();
                    // lo = where(y >= mid, mid + 1, lo) over log2(levels) halvings.
                    let (mut lo, mut hi) = (0usize, mids.len());
                    while lo < hi {
                        let mid = (lo + hi) / 2;
                        if y >= mids[mid] {
                            lo = mid + 1;
                        } else {
                            hi = mid;
                        }
                    }
                    lo as u8
                })
                .collect();
            slot.extend(vllm_pack(&codes, bits));
            slot.extend(f16::from_f32(norm).to_bits().to_le_bytes());
        }
    }
    let top = ((1u32 << p.value_bits()) - 1) as f32;
    let mn = value.iter().copied().fold(f32::INFINITY, f32::min);
    let mx = value.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let scale = ((mx - mn) / top).max(1e-8);
    let codes: Vec<u8> = value
        .iter()
        .map(|v| (((v - mn) / scale + 0.5) as i32).clamp(0, top as i32) as u8)
        .collect();
    slot.extend(vllm_pack(&codes, p.value_bits()));
    slot.extend(f16::from_f32(scale).to_bits().to_le_bytes());
    slot.extend(f16::from_f32(mn).to_bits().to_le_bytes());
    if slot.len() % 2 == 1 {
        slot.push(0);
    }
    slot
}

/// Normal rows with an outlier channel, as keys and values look.
fn rows(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let g = sketch_matrix(D, seed).unwrap();
    (0..n)
        .map(|r| {
            let mut v: Vec<f32> = g[r * D..][..D].iter().map(|&x| x as f32).collect();
            v[(r * 37) % D] *= 6.0;
            if r % 16 == 5 {
                v[(r * 11) % D] = 1000.0 * (r as f32 - 30.0).signum(); // past E4M3's 448
            }
            v
        })
        .collect()
}

#[test]
fn slot_sizes_are_vllms() {
    let sizes: Vec<usize> = Preset::ALL
        .iter()
        .map(|p| p.slot_bytes(D).unwrap())
        .collect();
    assert_eq!(sizes, [196, 134, 118, 102]);
    assert_eq!(Preset::K3V4Nc.key_bytes(64).unwrap(), 26);
    assert!(Preset::FourBitNc.slot_bytes(96).is_err()); // no Hadamard of 96 in vLLM
    assert_eq!(Preset::K8V4.slot_bytes(96).unwrap(), 96 + 52);
}

#[test]
fn codebooks_are_vllms_solver() {
    for (bits, want) in [(3, book(3)), (4, book(4))] {
        let got = codebook(D, bits).unwrap();
        assert_eq!(
            got.iter().map(|c| c.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|c| c.to_bits()).collect::<Vec<_>>(),
            "{bits} bits"
        );
    }
}

/// Slots built by vLLM's rules decode in rotq to vLLM's reconstruction (its norm-corrected
/// centroids rotated back, `code · scale + min` for values); and rotq writes the same bytes but
/// for key codes where f32 and f64 rotations put a value on either side of a boundary.
#[test]
fn vllm_slots_decode_and_encode_in_rotq() {
    let keys = rows(64, 1);
    let values = rows(64, 2);
    let h = hadamard_f32();
    for p in Preset::ALL {
        let (mut differing, mut codes) = (0usize, 0usize);
        for (key, value) in keys.iter().zip(&values) {
            let slot = vllm_slot(p, key, value);
            assert_eq!(slot.len(), p.slot_bytes(D).unwrap());
            let (k, v) = p.decode_slot(&slot, D).unwrap();
            // Values: code · f16 scale + f16 min, from the bytes.
            let vb = p.value_bytes(D).unwrap();
            let vfield = &slot[p.key_bytes(D).unwrap()..][..vb];
            let f = |at: usize| {
                f16::from_bits(u16::from_le_bytes([vfield[at], vfield[at + 1]])).to_f32()
            };
            let (s, m) = (f(vb - 4), f(vb - 2));
            let top = (1u32 << p.value_bits()) - 1;
            for (i, (&got, &orig)) in v.iter().zip(value).enumerate() {
                assert!(
                    (got - orig).abs() <= 0.51 * s + 1e-3 * orig.abs().max(1.0),
                    "{} value {i}",
                    p.name()
                );
                let code = ((got - m) / s).round();
                assert!(code >= 0.0 && code <= top as f32);
            }
            // Keys: the codebook presets' reconstruction, computed from the bytes by vLLM's
            // decode: centroids, unit norm, times the f16 norm, rotated back.
            if let Some(bits) = p.key_bits() {
                let kb = p.key_bytes(D).unwrap();
                let c = book(bits);
                let idx: Vec<usize> = (0..D)
                    .map(|i| {
                        let at = i * bits as usize;
                        let w = u16::from(slot[at / 8]) | u16::from(slot[at / 8 + 1]) << 8;
                        ((w >> (at % 8)) & ((1 << bits) - 1)) as usize
                    })
                    .collect();
                let unit = (idx.iter().map(|&i| c[i] * c[i]).sum::<f32>() + 1e-16).sqrt();
                let norm =
                    f16::from_bits(u16::from_le_bytes([slot[kb - 2], slot[kb - 1]])).to_f32();
                for (j, &got) in k.iter().enumerate() {
                    let want: f32 = (0..D).map(|i| norm * c[idx[i]] / unit * h[j * D + i]).sum();
                    assert!(
                        (got - want).abs() <= 1e-5 * norm,
                        "{} key {j}: {got} vs {want}",
                        p.name()
                    );
                }
            } else {
                for (&got, &orig) in k.iter().zip(key) {
                    // Half an E4M3 step: 1/16 relative, 2^-10 among the subnormals; ±448 past
                    // the range (saturated).
                    let orig = orig.clamp(-448.0, 448.0);
                    assert!(
                        (got - orig).abs() <= orig.abs() / 16.0 + 1.0 / 1024.0,
                        "{}: {got} vs {orig}",
                        p.name()
                    );
                }
            }
            // rotq's own encoding: the same bytes but for boundary key codes.
            let mut ours = vec![0u8; slot.len()];
            p.encode_slot(key, value, &mut ours).unwrap();
            let kb = p.key_bytes(D).unwrap();
            assert_eq!(ours[kb..], slot[kb..], "{}: values and pad", p.name());
            assert_eq!(ours[kb - 2..kb], slot[kb - 2..kb], "{}: the norm", p.name());
            if let Some(bits) = p.key_bits() {
                let unpack = |b: &[u8], i: usize| {
                    let at = i * bits as usize;
                    let w = u16::from(b[at / 8]) | u16::from(b[at / 8 + 1]) << 8;
                    i32::from(((w >> (at % 8)) & ((1 << bits) - 1)) as u8)
                };
                for i in 0..D {
                    let (a, b) = (unpack(&ours, i), unpack(&slot, i));
                    assert!((a - b).abs() <= 1, "{} key code {i}: {a} vs {b}", p.name());
                    differing += usize::from(a != b);
                    codes += 1;
                }
            } else {
                assert_eq!(ours, slot);
            }
        }
        assert!(
            differing * 200 <= codes.max(1),
            "{}: {differing} of {codes} key codes differ",
            p.name()
        );
    }
}

/// Bad shapes are typed errors, never a panic.
#[test]
fn bad_slots_are_refused() {
    let p = Preset::FourBitNc;
    let mut slot = vec![0u8; 133];
    assert!(p.encode_slot(&[0.5; D], &[0.5; D], &mut slot).is_err());
    assert!(p.decode_slot(&slot, D).is_err());
    let mut slot = vec![0u8; 134];
    assert!(p.encode_slot(&[0.5; D], &[0.5; 64], &mut slot).is_err());
    assert!(p.encode_slot(&[0.5; 100], &[0.5; 100], &mut slot).is_err());
    assert!(codebook(128, 0).is_err());
    assert!(Preset::FourBitNc.slot_bytes(1 << 62).is_err());
    assert!(Preset::K8V4.slot_bytes(8192).is_err());
    // A zero key and a constant value: norm 0, scale floored at 1e-8, all decode finite.
    p.encode_slot(&[0.0; D], &[0.25; D], &mut slot).unwrap();
    let (k, v) = p.decode_slot(&slot, D).unwrap();
    assert!(k.iter().all(|&x| x == 0.0));
    assert!(v.iter().all(|&x| (x - 0.25).abs() < 1e-3));
}

/// The registry's `vllm_*` formats are the slots' parts: a K cache of `vllm_k4` rows and a V
/// cache of `vllm_v4` rows hold, row by row, exactly the bytes of vLLM's `turboquant_4bit_nc`
/// slots (and so for every preset), and decode to the slot's key and value.
#[test]
fn registry_formats_are_the_slots_parts() {
    use rotq_reference::KvFormat;
    let keys = rows(6, 31);
    let values = rows(6, 32);
    for p in Preset::ALL {
        let (kf, vf): (KvFormat, KvFormat) = (
            p.key_part().name().parse().unwrap(),
            p.value_part().name().parse().unwrap(),
        );
        let k_rows = kf.quantize_rows(&keys.concat(), D).unwrap();
        let v_rows = vf.quantize_rows(&values.concat(), D).unwrap();
        let (kb, vb) = (kf.row_bytes(D).unwrap(), vf.row_bytes(D).unwrap());
        assert_eq!(
            (kb, vb),
            (p.key_bytes(D).unwrap(), p.value_bytes(D).unwrap())
        );
        for (i, (k, v)) in keys.iter().zip(&values).enumerate() {
            let slot = vllm_slot(p, k, v);
            assert_eq!(&slot[..kb], &k_rows[i * kb..][..kb], "{} key {i}", p.name());
            assert_eq!(
                &slot[kb..kb + vb],
                &v_rows[i * vb..][..vb],
                "{} value {i}",
                p.name()
            );
            let (dk, dv) = p.decode_slot(&slot, D).unwrap();
            assert_eq!(dk, kf.dequantize_row(&k_rows[i * kb..][..kb]).unwrap());
            assert_eq!(dv, vf.dequantize_row(&v_rows[i * vb..][..vb]).unwrap());
        }
    }
    // A row with NaN or ±∞ decodes to NaN everywhere (vLLM leaves it undefined; rotq never
    // stores a silently finite row), other rows as without it.
    for f in KvFormat::VLLM {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = keys.concat();
            x[D + 7] = bad;
            let back = f
                .dequantize_rows(&f.quantize_rows(&x, D).unwrap(), D)
                .unwrap();
            assert!(back[D..2 * D].iter().all(|v| v.is_nan()), "{f} {bad}");
            let clean = f.dequantize_rows(&f.quantize_rows(&keys.concat(), D).unwrap(), D);
            assert_eq!(back[..D], clean.unwrap()[..D], "{f}");
        }
        // vLLM's keys take powers of two only (its Hadamard); its values any multiple of 8.
        let keyed = matches!(f, KvFormat::VllmK4 | KvFormat::VllmK3);
        assert_eq!(f.check_row_len(96).is_err(), keyed, "{f}");
        assert!(f.check_row_len(100).is_err() && f.check_row_len(0).is_err());
    }
}
