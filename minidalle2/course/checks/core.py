"""The pieces every exercise check is made of. A check reads like a short list of expectations:

    out = call(student_fn, mu, logvar, name="reparameterize")
    expect_shape(out, mu.shape, "z")
    expect_close(out, reference, "z for a fixed eps")
    passed("reparameterize", "shape, values and gradients match")
"""

import torch


class CheckFailed(AssertionError):
    """The student's answer is wrong; the message says how."""


def call(fn, *args, name=None, **kwargs):
    """Call the student's function; turn 'not written yet' and crashes into clear messages."""
    name = name or getattr(fn, "__name__", "your function")
    if not callable(fn):
        raise CheckFailed(f"{name}: expected a function, got {type(fn).__name__}")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise NotImplementedError(f"{name} is not written yet: replace `raise NotImplementedError` "
                                  "in the exercise cell above with your code, run it, then run this cell") from None
    except CheckFailed:
        raise
    except Exception as e:  # the student's code crashed on a valid input: show where, briefly
        raise CheckFailed(f"{name} raised {type(e).__name__}: {e}") from e


def _shape(x):
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def expect_shape(x, shape, what):
    """x must be a tensor of exactly this shape."""
    if not isinstance(x, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise CheckFailed(f"{what}: wrong shape: got {_shape(x)}, expected {tuple(shape)}")
    return x


def expect_scalar(x, what):
    """x must be a tensor with one element (a loss)."""
    if not isinstance(x, torch.Tensor) or x.numel() != 1:
        raise CheckFailed(f"{what}: expected a scalar tensor (one number), got {_shape(x)}"
                          + (" - did you forget .mean() or .sum()?" if isinstance(x, torch.Tensor) else ""))
    return x


def expect_close(actual, expected, what, atol=1e-5, rtol=1e-4, hint=""):
    """Same shape and values up to tolerance; else name the largest difference and where it is."""
    expected = torch.as_tensor(expected)
    if not isinstance(actual, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(actual).__name__}")
    if actual.shape != expected.shape:
        raise CheckFailed(f"{what}: wrong shape: got {_shape(actual)}, expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        raise CheckFailed(f"{what}: contains NaN or inf")
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol)
    if bad.any():
        diff = (a - e).abs()
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.ndim else ()
        raise CheckFailed(f"{what}: wrong values: {int(bad.sum())} of {bad.numel()} differ; largest "
                          f"difference {diff.max().item():.4g} at index {where} (got {a[where].item():.6g}, "
                          f"expected {e[where].item():.6g})" + (f". Hint: {hint}" if hint else ""))
    return actual


def passed(name, what):
    """Print the success line (a failed check raises instead, which is what a grader counts)."""
    print(f"\N{CHECK MARK} {name}: correct - {what}")
