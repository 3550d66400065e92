//! The safe wrappers on small problems: typed errors for bad input, the peers' quantized
//! bytes equal to rotq's, and attention that agrees with rotq's on the same cache bytes. Each
//! test skips (with a note) where the peer libraries are not built
//! (`scripts/peers-setup.sh` builds them).

use rotq_cpu::{CacheCodec, CpuAttention, Isa, KvCacheView};
use rotq_peers::{
    ElemType, FlashAttnSpec, MaskKind, Peer, PeerError, PeerKind, QuantizePath, RotationKind,
};
use rotq_reference::{AttentionParams, KvFormat, RotationPlan};

fn peers() -> Vec<Peer> {
    [PeerKind::IkLlamaCpp, PeerKind::LlamaCpp]
        .into_iter()
        .filter_map(|k| match Peer::load_default(k) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("skipping {}: {e}", k.name());
                None
            }
        })
        .collect()
}

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| {
            let h = (i ^ seed)
                .wrapping_mul(2_654_435_761)
                .rotate_left(13)
                .wrapping_mul(0x9E37_79B1);
            (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

#[test]
fn bad_input_is_a_typed_error() {
    for peer in peers() {
        let spec = FlashAttnSpec::decode(ElemType::Q8_0, 1, 64, 2, 64, 4, 1);
        let (kb, vb) = spec.cache_bytes().unwrap();
        let (k, v) = (vec![0u8; kb], vec![0u8; vb]);
        assert!(matches!(
            peer.flash_attn(&spec, &k[1..], &v),
            Err(PeerError::Invalid(_))
        ));
        let odd = FlashAttnSpec { h_q: 3, ..spec };
        assert!(matches!(
            peer.flash_attn(&odd, &k, &v),
            Err(PeerError::Invalid(_))
        ));
        let mut fa = peer.flash_attn(&spec, &k, &v).unwrap();
        let mut out = vec![0f32; spec.q_len()];
        assert!(matches!(
            fa.run(&[0f32; 3], &mut out),
            Err(PeerError::Invalid(_))
        ));
        assert!(matches!(
            peer.quantize(ElemType::Q4_0, QuantizePath::Reference, &[0.0; 31]),
            Err(PeerError::Invalid(_))
        ));
        let x = vec![0f32; 3 * 64];
        let mut o = vec![0u8; 3 * 64 * 4];
        assert!(matches!(
            peer.rotate(RotationKind::DenseMatmul, 48, &x, ElemType::F32, &mut o, 1),
            Err(PeerError::Invalid(_))
        ));
        let other = match peer.kind() {
            PeerKind::LlamaCpp => RotationKind::HadamardOp,
            PeerKind::IkLlamaCpp => RotationKind::HintedMatmul,
        };
        assert!(matches!(
            peer.rotate(other, 64, &x, ElemType::F32, &mut o, 1),
            Err(PeerError::Unsupported { .. })
        ));
        assert!(matches!(
            ElemType::of(KvFormat::Q4_1),
            Err(PeerError::Format(_))
        ));
    }
}

#[test]
fn quantized_bytes_equal_rotq() {
    let x = values(32 * 512, 5);
    for peer in peers() {
        for (format, ty) in [
            (KvFormat::Q4_0, ElemType::Q4_0),
            (KvFormat::Q8_0, ElemType::Q8_0),
        ] {
            let ours = format.quantize_row(&x).unwrap();
            assert_eq!(
                peer.quantize(ty, QuantizePath::Reference, &x).unwrap(),
                ours,
                "{} {format}",
                peer.kind().name()
            );
        }
    }
}

#[test]
fn attention_agrees_with_rotq_on_the_same_bytes() {
    let (n_kv, h_kv, d, h_q) = (256, 2, 64, 8);
    for peer in peers() {
        for format in [KvFormat::Q4_0, KvFormat::Q8_0, KvFormat::F16] {
            let codec = CacheCodec::new(format, d, None, Isa::best()).unwrap();
            let mut kb = vec![0u8; n_kv * h_kv * codec.row_bytes()];
            let mut vb = kb.clone();
            codec
                .quantize(&values(n_kv * h_kv * d, 1), &mut kb, 0)
                .unwrap();
            codec
                .quantize(&values(n_kv * h_kv * d, 2), &mut vb, 0)
                .unwrap();
            // Two query rows, causal: row 0 sees keys up to n_kv - 2.
            let q: Vec<f32> = values(2 * h_q * d, 3).iter().map(|x| 3.0 * x).collect();
            let params = AttentionParams {
                causal: true,
                pos_offset: n_kv - 2,
                ..Default::default()
            };
            let k = KvCacheView::new(format, &kb, n_kv, h_kv, d).unwrap();
            let v = KvCacheView::new(format, &vb, n_kv, h_kv, d).unwrap();
            let ours = CpuAttention::new(&RotationPlan::none(), Isa::best())
                .run(&q, 2, h_q, &k, &v, &params)
                .unwrap();
            let spec = FlashAttnSpec {
                n_q: 2,
                mask: MaskKind::Causal {
                    pos_offset: n_kv - 2,
                },
                ..FlashAttnSpec::decode(ElemType::of(format).unwrap(), 1, n_kv, h_kv, d, h_q, 2)
            };
            let mut out = vec![0f32; spec.q_len()];
            peer.flash_attn(&spec, &kb, &vb)
                .unwrap()
                .run(&q, &mut out)
                .unwrap();
            let scale = ours.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = ours
                .iter()
                .zip(&out)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // q8_0/f16 query rounding and llama.cpp's f16 accumulator (see peer_bench's tolerance).
            assert!(
                err < 3e-2 * scale,
                "{} {format}: error {err} of scale {scale}",
                peer.kind().name()
            );
        }
    }
}
