//! ggml's tensor type ids: their names and block layouts, so that the reader can check every
//! tensor's bytes lie inside the file (whatever its type), and which of them rotq's format
//! registry dequantizes.

use rotq_reference::KvFormat;

/// One ggml tensor type: its name, values per block and bytes per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType {
    /// ggml's type id (`GGML_TYPE_*`).
    pub id: u32,
    /// ggml's name for it (`q4_1`, `q6_K`, …).
    pub name: &'static str,
    /// Values per block.
    pub block_size: u64,
    /// Bytes per block.
    pub block_bytes: u64,
}

const fn t(id: u32, name: &'static str, block_size: u64, block_bytes: u64) -> GgmlType {
    GgmlType {
        id,
        name,
        block_size,
        block_bytes,
    }
}

/// Every type id ggml (as of 2025) defines; ids it retired (4, 5, 31–33, 36–38) are absent.
const TYPES: &[GgmlType] = &[
    t(0, "f32", 1, 4),
    t(1, "f16", 1, 2),
    t(2, "q4_0", 32, 18),
    t(3, "q4_1", 32, 20),
    t(6, "q5_0", 32, 22),
    t(7, "q5_1", 32, 24),
    t(8, "q8_0", 32, 34),
    t(9, "q8_1", 32, 36),
    t(10, "q2_K", 256, 84),
    t(11, "q3_K", 256, 110),
    t(12, "q4_K", 256, 144),
    t(13, "q5_K", 256, 176),
    t(14, "q6_K", 256, 210),
    t(15, "q8_K", 256, 292),
    t(16, "iq2_xxs", 256, 66),
    t(17, "iq2_xs", 256, 74),
    t(18, "iq3_xxs", 256, 98),
    t(19, "iq1_s", 256, 50),
    t(20, "iq4_nl", 32, 18),
    t(21, "iq3_s", 256, 110),
    t(22, "iq2_s", 256, 82),
    t(23, "iq4_xs", 256, 136),
    t(24, "i8", 1, 1),
    t(25, "i16", 1, 2),
    t(26, "i32", 1, 4),
    t(27, "i64", 1, 8),
    t(28, "f64", 1, 8),
    t(29, "iq1_m", 256, 56),
    t(30, "bf16", 1, 2),
    t(34, "tq1_0", 256, 54),
    t(35, "tq2_0", 256, 66),
    t(39, "mxfp4", 32, 17),
];

impl GgmlType {
    /// The type with ggml id `id`, if ggml defines one.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|ty| ty.id == id).copied()
    }

    /// The rotq format that decodes this type's blocks byte for byte, if there is one.
    pub fn kv_format(self) -> Option<KvFormat> {
        Some(match self.id {
            0 => KvFormat::F32,
            1 => KvFormat::F16,
            2 => KvFormat::Q4_0,
            3 => KvFormat::Q4_1,
            6 => KvFormat::Q5_0,
            7 => KvFormat::Q5_1,
            8 => KvFormat::Q8_0,
            20 => KvFormat::Iq4Nl,
            30 => KvFormat::Bf16,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_types_agree_with_the_registry() {
        let mut supported = 0;
        for ty in TYPES {
            assert_eq!(GgmlType::from_id(ty.id), Some(*ty));
            if let Some(f) = ty.kv_format() {
                supported += 1;
                assert_eq!(f.name(), ty.name);
                assert_eq!(f.block_size() as u64, ty.block_size, "{}", ty.name);
                assert_eq!(f.block_bytes() as u64, ty.block_bytes, "{}", ty.name);
            }
        }
        assert_eq!(supported, 9);
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(u32::MAX), None);
    }
}
