//! The portable FWHT: plain loops, the same passes as the AVX2 path.

/// What to multiply the output of a transform by, element-wise, as it is stored.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Post<'a> {
    /// One factor for every element (the `1/√n` normalization).
    Scale(f32),
    /// A factor per element (normalization times the signs of an inverse randomized Hadamard).
    Vector(&'a [f32]),
}

impl Post<'_> {
    #[inline(always)]
    pub(crate) fn at(&self, i: usize) -> f32 {
        match self {
            Post::Scale(s) => *s,
            Post::Vector(v) => v[i],
        }
    }
}

/// Unnormalized Sylvester transform of `x` (a power of two), with `x ⊙ pre` taken as the input
/// and the output multiplied by `post`.
#[inline(always)]
pub(crate) fn fwht(x: &mut [f32], pre: Option<&[f32]>, post: Post<'_>) {
    let n = x.len();
    if let Some(s) = pre {
        x.iter_mut().zip(s).for_each(|(v, s)| *v *= s);
    }
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, d) = (*u + *v, *u - *v);
                *u = s;
                *v = d;
            }
        }
        h *= 2;
    }
    match post {
        Post::Scale(s) => x.iter_mut().for_each(|v| *v *= s),
        Post::Vector(p) => x.iter_mut().zip(p).for_each(|(v, s)| *v *= s),
    }
}

/// `y[a] = post ⊙ Σ_b signs[a·m + b] · x[b]` over `m` chunks of length `p = x.len() / m`.
#[inline(always)]
pub(crate) fn mix(x: &[f32], y: &mut [f32], signs: &[f32], m: usize, post: Post<'_>) {
    let p = x.len() / m;
    y.fill(0.0);
    for a in 0..m {
        let ya = &mut y[a * p..(a + 1) * p];
        for b in 0..m {
            let xb = &x[b * p..(b + 1) * p];
            if signs[a * m + b] > 0.0 {
                ya.iter_mut().zip(xb).for_each(|(o, v)| *o += v);
            } else {
                ya.iter_mut().zip(xb).for_each(|(o, v)| *o -= v);
            }
        }
    }
    for (i, v) in y.iter_mut().enumerate() {
        *v *= post.at(i);
    }
}
