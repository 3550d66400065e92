//! What rotq's tests share, so that each concept has one place: the seeded test data
//! ([`data`]), the rotations a test runs for ([`rotations`]), how a cache's rows are laid out
//! in pages ([`layout`]), the comparison with the oracle under the tolerance table
//! ([`oracle`]), and work run on several threads at once ([`threads`]). With the feature `fuzzing`, the properties the fuzz targets check
//! (`fuzzing`), which the corpus replay test runs too.
//!
//! Not published (`publish = false`): a dev-dependency of the library crates, and a
//! dependency of the tools (the autotuner and the benchmarks draw their data from it).
//!
//! ```
//! use rotq_testkit::{data::Rows, oracle::assert_matches, rotations::RotationKind};
//! use rotq_reference::tolerance::{Op, Precision};
//! let x = Rows::outliers().f32s(4 * 64, 7);
//! let r = RotationKind::Hadamard.build(64, 0).unwrap();
//! let mut want: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
//! r.rotate_rows(&mut want, false).unwrap();
//! let mut got = want.clone();
//! got[0] += 1e-9;
//! assert_matches(&got, &want, Op::Rotation, Precision::F32, "one row");
//! ```

pub mod data;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod layout;
pub mod oracle;
pub mod rotations;
pub mod threads;
