"""Whitened natural images and 8x8 patches: the data of UFLDL's sparse autoencoder exercise.

UFLDL samples patches from IMAGES.mat: ten 512x512 photographs of natural scenes whitened by
Olshausen & Field's sparsenet script ("make-your-own-images").
When that file is not at hand we rebuild the same kind of data from the natural photographs
bundled with scikit-image (no network): grey, square, whitened with the same filter and
scaled with the same set-level rule.

Layouts: a set of images is (rows, cols, n_images) like IMAGES.mat; patches are rows,
(n_patches, patch_size**2).
"""

import functools
from pathlib import Path

import numpy as np
import scipy.io
import skimage.data
from PIL import Image
from skimage.color import rgb2gray
from skimage.transform import resize

from saekit.errors import UserError

# The photographs of natural things shipped inside scikit-image: files in the package, so
# loading them needs no network. Like Olshausen's scenes they hold no made objects: photographs
# of those (camera, astronaut, coffee, brick, rocket, motorcycle) are full of long straight edges
# and periodic texture (rocket.jpg also of JPEG's 8x8 blocks), and with them in the set most of
# the exercise's 25 filters were bars and gratings across the whole patch instead of local edges
# (the README's natural-images section has the measurements).
_PHOTOGRAPHS = ("grass.png", "gravel.png", "moon.png", "chelsea.png")
_DATA_DIR = Path(skimage.data.__file__).parent
_SOURCES = "http://www.rctn.org/bruno/sparsenet/ or the UFLDL sparse autoencoder exercise zip"


@functools.lru_cache(maxsize=1)
def _photographs() -> tuple[np.ndarray, ...]:
    greys = []
    for name in _PHOTOGRAPHS:
        pixels = np.asarray(Image.open(_DATA_DIR / name), dtype=np.float64) / 255.0
        grey = rgb2gray(pixels) if pixels.ndim == 3 else pixels
        side = min(grey.shape) // 2 * 2  # largest centred square with an even side
        top, left = (grey.shape[0] - side) // 2, (grey.shape[1] - side) // 2
        greys.append(grey[top : top + side, left : left + side])
    # One common size, so one whitening filter serves the whole set as in the sparsenet
    # script. Downscaling (anti-aliased) keeps each whole scene instead of a small crop.
    side = min(g.shape[0] for g in greys)
    squares = [g if g.shape[0] == side else resize(g, (side, side), anti_aliasing=True) for g in greys]
    for square in squares:
        square.flags.writeable = False  # shared by every caller through the cache
    return tuple(squares)


def bundled_photographs() -> list[np.ndarray]:
    """Four grey photographs from scikit-image (grass, gravel, moon, chelsea the cat), each
    (N, N) float64 in [0, 1], N = 300.

    Each is the largest centred even-sided square of its photograph, downscaled with
    anti-aliasing to the side of the smallest one (chelsea, 300). Arrays are read-only.
    """
    return list(_photographs())


def whiten(image: np.ndarray, f0_fraction: float = 0.4) -> np.ndarray:
    """Olshausen & Field's whitening of one (N, N) image; returns (N, N).

    Multiplies the spectrum by filt = rho * exp(-(rho / f_0)**4), rho the radial frequency
    in cycles/picture and f_0 = f0_fraction * N: the ramp rho flattens the 1/f amplitude
    spectrum of natural images, the exponential rolls off the noisy highest frequencies.
    The DC term is multiplied by 0, so the result has zero mean.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] != image.shape[1] or image.shape[0] < 2:
        raise UserError(
            f"whiten needs a square (N, N) image with N >= 2, got shape {image.shape}; crop it to a square first."
        )
    if not np.all(np.isfinite(image)):
        raise UserError("whiten got an image with NaN or inf pixels; clean the image first.")
    if not f0_fraction > 0:
        raise UserError(f"f0_fraction must be > 0, got {f0_fraction}.")
    n = image.shape[0]
    f = np.fft.fftfreq(n) * n  # cycles/picture, in fft2's own order
    rho = np.hypot(f[:, None], f[None, :])
    filt = rho * np.exp(-((rho / (f0_fraction * n)) ** 4))
    return np.fft.ifft2(np.fft.fft2(image) * filt).real


def whitened_images(images) -> np.ndarray:
    """Whiten each (N, N) image and scale the set to mean variance 0.1; returns (N, N, n).

    The scaling is the sparsenet script's IMAGES = sqrt(0.1)*IMAGES/sqrt(mean(var(IMAGES))),
    one factor for the whole set (MATLAB's var: per image, over pixels, ddof=1), so the
    images keep their relative contrast. All images must share one size.
    """
    images = [np.asarray(image) for image in images]
    if not images or any(image.shape != images[0].shape for image in images):
        raise UserError(
            f"whitened_images needs one or more images of one size, got shapes "
            f"{[image.shape for image in images]}; crop them to a common size."
        )
    stack = np.stack([whiten(image) for image in images], axis=-1)
    mean_var = stack.reshape(-1, stack.shape[-1]).var(axis=0, ddof=1).mean()
    if mean_var == 0:
        raise UserError("whitened_images got only flat images (nothing left after whitening); give it photographs.")
    return np.sqrt(0.1) * stack / np.sqrt(mean_var)


def load_images_mat(path) -> np.ndarray:
    """Load UFLDL's IMAGES.mat (variable IMAGES, 512x512x10 double) as (rows, cols, n) float64.

    A 2-D IMAGES is read as one image (MATLAB drops a trailing singleton dimension).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"IMAGES.mat not found at {path.resolve()}; download it from {_SOURCES}.")
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError:  # scipy's answer to MATLAB v7.3, which is HDF5 inside
        raise UserError(
            f"{path} is a MATLAB v7.3 (HDF5) file, which cannot be read here; "
            f"re-save it in MATLAB/Octave with: save -v7 {path.name} IMAGES"
        ) from None
    except Exception as error:  # any parse failure means the bytes are not a usable MAT file
        raise UserError(
            f"{path} is not a readable MATLAB .mat file ({error}); download IMAGES.mat again from {_SOURCES}."
        ) from None
    if "IMAGES" not in mat:
        found = sorted(name for name in mat if not name.startswith("__"))
        raise UserError(
            f"{path} has no variable named IMAGES (found: {found or 'none'}); "
            f"save the whitened images as IMAGES (rows x cols x n_images)."
        )
    images = mat["IMAGES"]
    if images.dtype.kind not in "fiu" or images.ndim not in (2, 3):
        raise UserError(
            f"IMAGES in {path} must be a numeric rows x cols x n_images array, "
            f"got {images.dtype} with shape {images.shape}."
        )
    images = images.astype(np.float64).reshape(images.shape[0], images.shape[1], -1)
    if not np.all(np.isfinite(images)):
        raise UserError(f"IMAGES in {path} contains NaN or inf values; re-create the file from clean images.")
    return images


def sample_patches(
    images: np.ndarray, patch_size: int = 8, n_patches: int = 10000, *, rng: np.random.Generator, order: str = "C"
) -> np.ndarray:
    """UFLDL's sampleIMAGES: n_patches random square windows of (rows, cols, n) images.

    Each patch comes from a uniformly random image at a uniformly random top-left corner
    and is flattened row-major (order="C") or column-major (order="F", MATLAB's patch(:)).
    Returns (n_patches, patch_size**2).
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise UserError(f"images must be (rows, cols, n_images), got shape {images.shape}.")
    rows, cols, n_images = images.shape
    if not isinstance(patch_size, (int, np.integer)) or not 1 <= patch_size <= min(rows, cols):
        raise UserError(f"patch_size must be between 1 and the image side {min(rows, cols)}, got {patch_size}.")
    if not isinstance(n_patches, (int, np.integer)) or n_patches < 1:
        raise UserError(f"n_patches must be >= 1, got {n_patches}.")
    if order not in ("C", "F"):
        raise UserError(f'order must be "C" (row-major) or "F" (MATLAB column-major), got {order!r}.')
    k = rng.integers(n_images, size=n_patches)
    top = rng.integers(rows - patch_size + 1, size=n_patches)
    left = rng.integers(cols - patch_size + 1, size=n_patches)
    offsets = np.arange(patch_size)
    # Fancy indexing gathers every patch at once: (n_patches, patch_size, patch_size).
    patches = images[(top[:, None] + offsets)[:, :, None], (left[:, None] + offsets)[:, None, :], k[:, None, None]]
    if order == "F":
        patches = patches.transpose(0, 2, 1)
    return patches.reshape(n_patches, patch_size * patch_size)


def normalize_patches(patches: np.ndarray) -> np.ndarray:
    """UFLDL's normalizeData on (n, d) patches; returns (n, d) in [0.1, 0.9].

    Removes each patch's mean (its DC), clips to +/- 3 standard deviations of all the
    remaining pixel values (MATLAB's std, ddof=1), divides by that bound to get [-1, 1] and
    maps onto [0.1, 0.9], the range a sigmoid output layer can reach.
    """
    patches = np.asarray(patches, dtype=np.float64)
    if patches.ndim != 2 or patches.size < 2:
        raise UserError(f"patches must be (n_patches, n_pixels) with at least 2 values, got shape {patches.shape}.")
    if not np.all(np.isfinite(patches)):
        raise UserError("patches contain NaN or inf values; check the images they came from.")
    patches = patches - patches.mean(axis=1, keepdims=True)
    pstd = 3 * patches.std(ddof=1)
    if pstd == 0:
        raise UserError(
            "every patch is flat (constant), so there is nothing to normalise; sample patches from real images."
        )
    patches = np.clip(patches, -pstd, pstd) / pstd
    return (patches + 1) * 0.4 + 0.1


@functools.lru_cache(maxsize=1)
def _bundled_whitened() -> np.ndarray:
    images = whitened_images(bundled_photographs())
    images.flags.writeable = False  # shared by every caller through the cache
    return images


def natural_image_patches(
    n_patches: int = 10000, patch_size: int = 8, seed: int = 0, images_mat=None, order: str = "C"
) -> np.ndarray:
    """The exercise's training data: (n_patches, patch_size**2) float64 in [0.1, 0.9].

    Samples from IMAGES.mat when images_mat (a path) is given, used as-is since it is
    already whitened, else from the whitened bundled photographs; then normalises.
    Deterministic for a given seed.
    """
    images = _bundled_whitened() if images_mat is None else load_images_mat(images_mat)
    rng = np.random.default_rng(seed)
    return normalize_patches(sample_patches(images, patch_size, n_patches, rng=rng, order=order))
