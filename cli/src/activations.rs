//! Activation dumps for `rotq eval`: per-layer Q, K and V read from a safetensors file or from
//! a folder of `.npy` files.
//!
//! The expected tensors, for each layer `L` (0, 1, … until a layer is missing), are named by a
//! template whose `{layer}` becomes `L` and `{t}` becomes `q`, `k` or `v` (default
//! `layers.{layer}.{t}`). Shapes: Q `[n_q, h_q, d]`, K `[n_kv, h_kv, d]`, V `[n_kv, h_kv, d_v]`,
//! the keys after RoPE as the cache would hold them, and the queries at the last `n_q`
//! positions (causal). In a safetensors file the dtypes f32, f16 or bf16 are read; in a folder,
//! tensor `NAME` is the file `NAME.npy` (little-endian f32, f16 or f64, C order; see
//! [`crate::npy`]), so the default template reads `layers.0.q.npy`, `layers.0.k.npy`, ….
//!
//! ```
//! use rotq_cli::activations::read_activations;
//! let err = read_activations(std::path::Path::new("/no/such.safetensors"), "layers.{layer}.{t}");
//! assert!(err.is_err());
//! ```

use crate::eval::{Activations, LayerShape};
use crate::npy::NpyError;
use crate::Error;
use half::{bf16, f16};
use ndarray::Array3;
use rotq_reference::AttentionParams;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The name of tensor `t` (`q`, `k` or `v`) of `layer` under `template`.
///
/// ```
/// assert_eq!(rotq_cli::activations::tensor_name("model.{layer}.attn_{t}", 3, "k"), "model.3.attn_k");
/// ```
pub fn tensor_name(template: &str, layer: usize, t: &str) -> String {
    template
        .replace("{layer}", &layer.to_string())
        .replace("{t}", t)
}

/// Reads every layer's Q, K and V from `path`: a safetensors file, or a folder of `.npy` files
/// (names from `template`, see the module docs). A missing file, a template without `{layer}`
/// and `{t}`, no layer 0, a layer with only some of its tensors, a tensor of another rank or
/// dtype, or shapes that do not fit together are errors naming the tensor (or its file).
/// [`Dump::open`] then [`Dump::read`], for a caller that looks at the shapes in between.
///
/// ```
/// use rotq_cli::activations::read_activations;
/// use rotq_cli::npy::{write, NpyDtype};
/// let dir = tempfile::tempdir().unwrap();
/// for (t, h) in [("q", 4), ("k", 2), ("v", 2)] {
///     let n = 8 * h * 32;
///     let data: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
///     let file = dir.path().join(format!("layers.0.{t}.npy"));
///     write(&file, &[8, h, 32], &data, NpyDtype::F16).unwrap();
/// }
/// let layers = read_activations(dir.path(), "layers.{layer}.{t}").unwrap();
/// assert_eq!(layers.len(), 1);
/// assert_eq!(layers[0].q.dim(), (8, 4, 32));
/// ```
pub fn read_activations(path: &Path, template: &str) -> Result<Vec<Activations>, Error> {
    Dump::open(path, template)?.read()
}

/// An activation dump whose headers have been read and checked: the shapes of every layer,
/// known before any value is read, so that `rotq eval` can refuse a dump it could not hold
/// (see [`crate::eval_grid::memory_needed`]) without reading it.
///
/// ```
/// use rotq_cli::activations::{write_safetensors, Dump, DumpDtype};
/// use rotq_cli::eval::Synthetic;
/// let layer = Synthetic { n_kv: 16, n_q: 2, d: 32, ..Default::default() }.generate();
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("acts.safetensors");
/// write_safetensors(&path, &[layer.clone()], "layers.{layer}.{t}", DumpDtype::F16).unwrap();
/// let dump = Dump::open(&path, "layers.{layer}.{t}").unwrap();
/// assert_eq!(dump.layers(), &[layer.shape()]);
/// assert_eq!(dump.reading_bytes(), std::fs::metadata(&path).unwrap().len());
/// assert_eq!(dump.read().unwrap()[0].shape(), layer.shape());
/// ```
#[derive(Clone, Debug)]
pub struct Dump {
    path: PathBuf,
    template: String,
    /// A folder of `.npy` files (else a safetensors file).
    folder: bool,
    layers: Vec<LayerShape>,
    reading: u64,
    /// Causal attention (a decoder's); a safetensors file whose metadata says
    /// `"attention": "bidirectional"` (an encoder's, e.g. BERT) is scored without a mask.
    causal: bool,
}

impl Dump {
    /// Reads and checks the headers of the dump at `path` (see [`read_activations`] for what
    /// is checked); no value is read.
    pub fn open(path: &Path, template: &str) -> Result<Dump, Error> {
        if !template.contains("{layer}") || !template.contains("{t}") {
            return Err(Error::Input(format!(
                "the tensor name template `{template}` needs both {{layer}} and {{t}}"
            )));
        }
        let folder = path.is_dir();
        let mut causal = true;
        let (layers, reading) = if folder {
            let file = |name: &str| npy_file(path, name);
            let layers = layer_shapes(
                |name| file(name).is_file(),
                |name| {
                    let file = file(name);
                    let header = crate::npy::read_header(&file)?;
                    match header.shape[..] {
                        [n, heads, d] => Ok((n, heads, d)),
                        _ => Err(Error::Npy {
                            path: file,
                            source: NpyError::Rank {
                                shape: header.shape,
                                want: 3,
                            },
                        }),
                    }
                },
                |name| file(name).display().to_string(),
                path,
                template,
            )?;
            // Each file is read whole, then converted.
            let mut largest = 0;
            for layer in 0..layers.len() {
                for t in ["q", "k", "v"] {
                    let name = tensor_name(template, layer, t);
                    let len = file_len(&file(&name))?;
                    largest = largest.max(len);
                }
            }
            (layers, largest)
        } else {
            let meta = safetensors_metadata(path)?;
            causal = meta
                .metadata()
                .as_ref()
                .and_then(|m| m.get("attention"))
                .is_none_or(|a| a != "bidirectional");
            let layers = layer_shapes(
                |name| meta.info(name).is_some(),
                |name| {
                    let info = meta
                        .info(name)
                        .ok_or_else(|| Error::Input(format!("{name}: no such tensor")))?;
                    let [n, heads, d] = info.shape[..] else {
                        return Err(rank_error(name, &info.shape));
                    };
                    check_dtype(name, info.dtype)?;
                    Ok((n, heads, d))
                },
                |name| name.to_string(),
                path,
                template,
            )?;
            // The file is read whole.
            (layers, file_len(path)?)
        };
        Ok(Dump {
            path: path.to_path_buf(),
            template: template.to_string(),
            folder,
            layers,
            reading,
            causal,
        })
    }

    /// The shapes of every layer, from the headers.
    pub fn layers(&self) -> &[LayerShape] {
        &self.layers
    }

    /// Whether the layers are scored with a causal mask (see the field's docs).
    pub fn causal(&self) -> bool {
        self.causal
    }

    /// Bytes that [`Dump::read`] holds at once beside the values it returns: the whole
    /// safetensors file, or the largest `.npy` file.
    pub fn reading_bytes(&self) -> u64 {
        self.reading
    }

    /// Reads the values: Q, K, V of every layer in f32. A tensor whose shape is no longer the
    /// one its header had when the dump was opened is an error.
    pub fn read(&self) -> Result<Vec<Activations>, Error> {
        let names = |layer| ["q", "k", "v"].map(|t| tensor_name(&self.template, layer, t));
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut add = |shape: &LayerShape, [q, k, v]: [Array3<f32>; 3]| {
            let read = LayerShape {
                q: q.dim(),
                k: k.dim(),
                v: v.dim(),
            };
            if read != *shape {
                return Err(Error::Input(format!(
                    "{}: changed while it was read (shapes {shape:?}, then {read:?})",
                    self.path.display(),
                )));
            }
            layers.push(Activations {
                q,
                k,
                v,
                params: AttentionParams {
                    causal: self.causal,
                    // The headers were checked: n_q <= n_kv.
                    pos_offset: shape.k.0 - shape.q.0,
                    ..Default::default()
                },
            });
            Ok(())
        };
        if self.folder {
            for (layer, shape) in self.layers.iter().enumerate() {
                let [q, k, v] = names(layer).map(|n| crate::npy::read3(&npy_file(&self.path, &n)));
                add(shape, [q?, k?, v?])?;
            }
        } else {
            let bytes = crate::io::read_bytes(&self.path)?;
            let file =
                SafeTensors::deserialize(&bytes).map_err(|e| not_safetensors(&self.path, e))?;
            for (layer, shape) in self.layers.iter().enumerate() {
                let [q, k, v] = names(layer).map(|n| array(&file, &n));
                add(shape, [q?, k?, v?])?;
            }
        }
        Ok(layers)
    }
}

/// The file of tensor `name` in the folder `dir`.
fn npy_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.npy"))
}

fn file_len(path: &Path) -> Result<u64, Error> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
}

fn not_safetensors(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: not a safetensors file: {why}", path.display()))
}

/// The header of the safetensors file at `path`, read alone (8 bytes of length, then the JSON
/// header) and checked against the file's length; no value is read.
fn safetensors_metadata(path: &Path) -> Result<Metadata, Error> {
    // safetensors' own limit on the header.
    const MAX_HEADER: u64 = 100_000_000;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    if len < 8 {
        return Err(not_safetensors(
            path,
            format!("{len} bytes, less than a header"),
        ));
    }
    file.read_exact(&mut n).map_err(io)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > len - 8 {
        return Err(not_safetensors(
            path,
            format!("a header of {n} bytes in a file of {len}"),
        ));
    }
    let mut header = Vec::new();
    (&mut file).take(n).read_to_end(&mut header).map_err(io)?;
    let meta: Metadata = serde_json::from_slice(&header).map_err(|e| not_safetensors(path, e))?;
    let data = len - 8 - n;
    if meta.data_len() as u64 != data {
        return Err(not_safetensors(
            path,
            format!(
                "its header describes {} bytes of tensors, the file has {data}",
                meta.data_len()
            ),
        ));
    }
    Ok(meta)
}

/// Layers 0, 1, … until one has none of its tensors: `present(name)` says whether a tensor
/// exists, `shape(name)` gives its shape from its header, `label(name)` is how errors call it.
/// Checks that each layer has all three tensors and that their shapes fit together.
fn layer_shapes(
    present: impl Fn(&str) -> bool,
    shape: impl Fn(&str) -> Result<(usize, usize, usize), Error>,
    label: impl Fn(&str) -> String,
    path: &Path,
    template: &str,
) -> Result<Vec<LayerShape>, Error> {
    let mut layers = Vec::new();
    for layer in 0.. {
        let names = ["q", "k", "v"].map(|t| tensor_name(template, layer, t));
        let count = names.iter().filter(|n| present(n)).count();
        if count == 0 {
            break;
        }
        if count < 3 {
            return Err(Error::Input(format!(
                "layer {layer} has only some of {}, {} and {}",
                label(&names[0]),
                label(&names[1]),
                label(&names[2])
            )));
        }
        let [q, k, v] = names.clone().map(|n| shape(&n));
        let (q, k, v) = (q?, k?, v?);
        let ((n_q, h_q, d), (n_kv, h_kv, dk), (n_v, h_v, _)) = (q, k, v);
        if dk != d || n_v != n_kv || h_v != h_kv || h_kv == 0 || h_q % h_kv != 0 || n_q > n_kv {
            return Err(Error::Input(format!(
                "layer {layer}: shapes Q {q:?} ({}), K {k:?} ({}), V {v:?} ({}) do not fit (Q \
                 [n_q, h_q, d] with n_q <= n_kv and h_q a multiple of h_kv, K [n_kv, h_kv, d], \
                 V [n_kv, h_kv, d_v])",
                label(&names[0]),
                label(&names[1]),
                label(&names[2])
            )));
        }
        layers.push(LayerShape { q, k, v });
    }
    if layers.is_empty() {
        return Err(Error::Input(format!(
            "{}: no tensor {} (the template is `{template}`)",
            path.display(),
            label(&tensor_name(template, 0, "q"))
        )));
    }
    Ok(layers)
}

fn rank_error(name: &str, shape: &[usize]) -> Error {
    Error::Input(format!(
        "{name}: shape {shape:?}, want [tokens, heads, dim]"
    ))
}

fn check_dtype(name: &str, dtype: Dtype) -> Result<(), Error> {
    match dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => Ok(()),
        other => Err(Error::Input(format!(
            "{name}: dtype {other:?}, want f32, f16 or bf16"
        ))),
    }
}

/// One tensor as `[a, b, c]` f32.
fn array(file: &SafeTensors<'_>, name: &str) -> Result<Array3<f32>, Error> {
    let t = file
        .tensor(name)
        .map_err(|e| Error::Input(format!("{name}: {e}")))?;
    let shape = t.shape();
    if shape.len() != 3 {
        return Err(rank_error(name, shape));
    }
    check_dtype(name, t.dtype())?;
    let data = t.data();
    let values: Vec<f32> = match t.dtype() {
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => crate::io::decode_f32(data).collect(),
    };
    Array3::from_shape_vec((shape[0], shape[1], shape[2]), values)
        .map_err(|e| Error::Input(format!("{name}: {e}")))
}

/// How [`write_safetensors`] stores values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpDtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 (what model dumps usually hold).
    F16,
}

/// Writes `layers` to a safetensors file at `path` under the names of `template`, in `dtype`,
/// atomically: the layout [`read_activations`] reads.
///
/// ```
/// use rotq_cli::activations::{read_activations, write_safetensors, DumpDtype};
/// use rotq_cli::eval::Synthetic;
/// let layer = Synthetic { n_kv: 16, n_q: 2, d: 32, ..Default::default() }.generate();
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("acts.safetensors");
/// write_safetensors(&path, &[layer.clone()], "layers.{layer}.{t}", DumpDtype::F32).unwrap();
/// assert_eq!(read_activations(&path, "layers.{layer}.{t}").unwrap()[0].k, layer.k);
/// ```
pub fn write_safetensors(
    path: &Path,
    layers: &[Activations],
    template: &str,
    dtype: DumpDtype,
) -> Result<(), Error> {
    let mut owned = Vec::new();
    for (i, a) in layers.iter().enumerate() {
        for (t, x) in [("q", &a.q), ("k", &a.k), ("v", &a.v)] {
            let bytes: Vec<u8> = match dtype {
                DumpDtype::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DumpDtype::F16 => x
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            owned.push((tensor_name(template, i, t), x.shape().to_vec(), bytes));
        }
    }
    let st = match dtype {
        DumpDtype::F32 => Dtype::F32,
        DumpDtype::F16 => Dtype::F16,
    };
    let views = owned
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(st, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Input(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    crate::io::write_atomic(path, &bytes)
}

/// Writes `layers` as `.npy` files into the folder `dir` (created if missing, with any
/// sub-folders the template names), tensor `NAME` of `template` as `NAME.npy`: the layout [`read_activations`] reads from a folder.
///
/// ```
/// use rotq_cli::activations::{read_activations, write_npy_folder};
/// use rotq_cli::eval::Synthetic;
/// use rotq_cli::npy::NpyDtype;
/// let layer = Synthetic { n_kv: 16, n_q: 2, d: 32, ..Default::default() }.generate();
/// let dir = tempfile::tempdir().unwrap();
/// write_npy_folder(dir.path(), &[layer.clone()], "L{layer}_{t}", NpyDtype::F32).unwrap();
/// assert!(dir.path().join("L0_q.npy").is_file());
/// assert_eq!(read_activations(dir.path(), "L{layer}_{t}").unwrap()[0].v, layer.v);
/// ```
pub fn write_npy_folder(
    dir: &Path,
    layers: &[Activations],
    template: &str,
    dtype: crate::npy::NpyDtype,
) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for (i, a) in layers.iter().enumerate() {
        for (t, x) in [("q", &a.q), ("k", &a.k), ("v", &a.v)] {
            let path = dir.join(format!("{}.npy", tensor_name(template, i, t)));
            // A template with `/` names files in sub-folders.
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            let values: Vec<f32> = x.iter().copied().collect();
            crate::npy::write(&path, x.shape(), &values, dtype)?;
        }
    }
    Ok(())
}
