"""What several recipes share: the Shapes training set, and sampling functions that ignore prompts."""

from .. import data


def shapes_train(size, **kwargs):
    """`size` scenes of the train split (seed 0: every recipe of a preset sees the same images)."""
    return data.ShapesDataset(size, "train", seed=0, **kwargs)


def unconditional(sample):
    """A recipe's sample(model, prompts, n, seed) for a model whose own sample(n, seed) ignores prompts."""
    def sample_fn(model, prompts, n, seed):
        if prompts is not None:
            raise ValueError("this model is unconditional: pass prompts=None")
        return sample(model, n, seed)
    return sample_fn
