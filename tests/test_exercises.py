"""The exercise mechanism: nbgrader-format solution cells -> student versions, and the check helpers."""

import nbformat
import pytest
import torch

from minidalle2.course import exercises
from minidalle2.__main__ import main as cli
from minidalle2.course.checks import CheckFailed, call, expect_close, expect_scalar, expect_shape, passed

SOLUTION = '''def square(x):
    """x squared."""
    ### BEGIN SOLUTION
    y = x * x
    return y
    ### END SOLUTION

print("defined")'''


def make_notebook(solution=SOLUTION, with_check=True):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("# An exercise"))
    nb.cells.append(nbformat.v4.new_code_cell(solution, metadata=exercises.solution_metadata("ex_square")))
    if with_check:
        nb.cells.append(nbformat.v4.new_code_cell("assert square(3) == 9",
                                                  metadata=exercises.check_metadata("ex_square_check")))
    nb.cells.append(nbformat.v4.new_code_cell("print('after')"))
    return nb


def test_strip_solution_keeps_indentation_and_the_rest():
    out = exercises.strip_solution(SOLUTION)
    assert out.splitlines() == ['def square(x):', '    """x squared."""', '    # YOUR CODE HERE',
                                '    raise NotImplementedError()', '', 'print("defined")']
    namespace = {}
    exec(out, namespace)  # the stub is valid Python and raises when called
    with pytest.raises(NotImplementedError):
        namespace["square"](2)


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without a ### BEGIN"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
])
def test_unbalanced_markers_are_named(source, message):
    with pytest.raises(exercises.ExerciseFormatError, match=message):
        exercises.strip_solution(source)


def test_student_version_strips_solutions_and_outputs_only():
    nb = make_notebook()
    nb.cells[3].outputs = [nbformat.v4.new_output("stream", text="after\n")]
    student = exercises.student_version(nb)
    assert "x * x" not in student.cells[1].source and "raise NotImplementedError()" in student.cells[1].source
    assert student.cells[2].source == nb.cells[2].source  # the check is kept as it is
    assert student.cells[3].outputs == []
    assert "x * x" in nb.cells[1].source  # the source notebook is untouched
    assert exercises.exercise_count(student) == 1


def test_problems_finds_missing_check_missing_metadata_and_duplicate_ids():
    assert exercises.problems(make_notebook()) == []
    assert any("not followed by a check" in p for p in exercises.problems(make_notebook(with_check=False)))
    nb = make_notebook()
    nb.cells[1].metadata = {}
    assert any("no nbgrader solution metadata" in p for p in exercises.problems(nb))
    nb = make_notebook()
    nb.cells[2].metadata = exercises.check_metadata("ex_square")
    assert any("used twice" in p for p in exercises.problems(nb))
    with pytest.raises(exercises.ExerciseFormatError, match="not followed by a check"):
        exercises.student_version(make_notebook(with_check=False))


def test_metadata_is_nbgrader_schema_3():
    sol, chk = exercises.solution_metadata("a")["nbgrader"], exercises.check_metadata("b", 2)["nbgrader"]
    assert sol["solution"] and not sol["grade"] and not sol["locked"] and sol["schema_version"] == 3
    assert chk["grade"] and chk["locked"] and chk["points"] == 2 and not chk["solution"]


def test_student_cli_writes_versions(tmp_path, capsys):
    src = tmp_path / "01_demo.ipynb"
    nbformat.write(make_notebook(), str(src))
    assert cli(["student", str(src), "--out", str(tmp_path / "out")]) == 0
    written = nbformat.read(str(tmp_path / "out" / "01_demo.ipynb"), as_version=4)
    assert "NotImplementedError" in written.cells[1].source
    assert "1 exercises" in capsys.readouterr().out
    bad = tmp_path / "02_bad.ipynb"
    nbformat.write(make_notebook(solution="### BEGIN SOLUTION\nx = 1"), str(bad))
    assert cli(["student", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "never closed" in capsys.readouterr().err


def test_errors_by_cell_reads_executed_outputs():
    nb = make_notebook()
    nb.cells[2].outputs = [nbformat.v4.new_output("error", ename="NotImplementedError", evalue="", traceback=[])]
    assert exercises.errors_by_cell(nb) == {2: "NotImplementedError"}


# ----------------------------------------------------------------------------- check helpers

def test_call_explains_not_implemented_and_crashes():
    def todo(x):
        raise NotImplementedError()
    with pytest.raises(NotImplementedError, match="todo is not written yet"):
        call(todo, 1)
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError"):
        call(lambda x: x / 0, 1, name="divide")
    with pytest.raises(CheckFailed, match="expected a function"):
        call(3, name="f")


def test_expectations_name_what_is_wrong(capsys):
    x = torch.arange(6.0).reshape(2, 3)
    assert expect_shape(x, (2, 3), "x") is x
    with pytest.raises(CheckFailed, match=r"wrong shape: got \(2, 3\), expected \(3, 2\)"):
        expect_shape(x, (3, 2), "x")
    with pytest.raises(CheckFailed, match="expected a torch.Tensor"):
        expect_shape([1, 2], (2,), "x")
    with pytest.raises(CheckFailed, match="did you forget"):
        expect_scalar(x, "loss")
    expect_close(x + 1e-7, x, "x")
    y = x.clone()
    y[1, 2] += 0.5
    with pytest.raises(CheckFailed, match=r"1 of 6 differ; largest difference 0.5 at index \(1, 2\)"):
        expect_close(y, x, "x")
    with pytest.raises(CheckFailed, match="NaN"):
        expect_close(x * float("nan"), x, "x")
    passed("demo", "all good")
    assert "demo: correct - all good" in capsys.readouterr().out


def _exercise_notebook(*later):
    nb = nbformat.v4.new_notebook()
    sol = nbformat.v4.new_code_cell("def f(x):\n    ### BEGIN SOLUTION\n    y = x + 1\n    return y\n    ### END SOLUTION")
    sol.metadata.update(exercises.solution_metadata("f"))
    check = nbformat.v4.new_code_cell("check(f)")
    check.metadata.update(exercises.check_metadata("f_check"))
    nb.cells = [sol, check] + [nbformat.v4.new_code_cell(s) for s in later]
    return nb


def test_reads_of_student_code_finds_later_cells_that_depend_on_an_exercise():
    # the exercise's function is called later (a dependency); its local `y` is not a name the notebook shares
    nb = _exercise_notebook("z = f(2)\ny = 3\nprint(y)", "def f(x):\n    return x\nprint(f(1))")
    assert exercises.reads_of_student_code(nb) == [(2, "f", 0)]      # cell 3 rebinds f before reading it
    assert exercises.reads_of_student_code(_exercise_notebook("print(y)", "%time g = [v for v in range(3)]")) == []


def test_through_last_check_ends_at_the_last_check_cell():
    nb = _exercise_notebook("print(1)", "print(2)")
    short = exercises.through_last_check(nb)
    assert len(short.cells) == 2 and exercises.is_check_cell(short.cells[-1]) and len(nb.cells) == 4
    plain = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    assert len(exercises.through_last_check(plain).cells) == 1


def test_written_answers_are_replaced_in_the_student_version():
    nb = make_notebook()
    written = nbformat.v4.new_markdown_cell("**Question.** Why?\n\n*A model answer.* Because.")
    written.metadata.update(exercises.answer_metadata("ex_why", points=2))
    nb.cells.append(written)
    assert exercises.problems(nb) == [] and exercises.is_answer_cell(written)
    student = exercises.student_version(nb)
    assert student.cells[-1].source == exercises.ANSWER_STUB and "Because" in nb.cells[-1].source
    written.metadata["nbgrader"]["points"] = 0
    assert any("written answer" in p for p in exercises.problems(nb))
    written.metadata.update(exercises.answer_metadata("ex_square"))       # a grade_id the exercise already uses
    assert any("used twice" in p for p in exercises.problems(nb))


# ============================================================================= chapter 13 (the unCLIP decoder): checks
# Each check accepts the library's answer and a student-style one, and rejects the usual wrong answers with a message
# that names the mistake.

import math  # noqa: E402
import re  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from minidalle2 import clip as clip_module, diffusion, upsampler  # noqa: E402
from minidalle2.course.checks import decoder as decoder_checks  # noqa: E402
from minidalle2.decoder import Decoder  # noqa: E402


def _nulled(conds, names):
    return {k: diffusion.null_condition(v) if k in names else v for k, v in conds.items()}


def _cfg(combine=lambda c, u, w: u + w * (c - u), nulls=lambda null, conds: null):
    """A student-style cfg_prediction: two passes, the second nulling nulls(null, conds), combined by `combine`."""
    def cfg_prediction(model, x_t, t, conds, w, null):
        pred_c = model(x_t, t, **conds)
        pred_u = model(x_t, t, **_nulled(conds, nulls(null, conds)))
        return combine(pred_c, pred_u, w)
    return cfg_prediction


def _zeros_as_null(model, x_t, t, conds, w, null):
    pred_c = model(x_t, t, **conds)
    pred_u = model(x_t, t, **{k: torch.zeros_like(v) if k in null else v for k, v in conds.items()})
    return pred_u + w * (pred_c - pred_u)


def _leaves_out(model, x_t, t, conds, w, null):
    pred_c = model(x_t, t, **conds)
    pred_u = model(x_t, t, **{k: v for k, v in conds.items() if k not in null})
    return pred_u + w * (pred_c - pred_u)


def _in_place(model, x_t, t, conds, w, null):
    pred_c = model(x_t, t, **conds)
    for k in null:
        conds[k] = diffusion.null_condition(conds[k])
    pred_u = model(x_t, t, **conds)
    return pred_u + w * (pred_c - pred_u)


def _not_written(*args):
    raise NotImplementedError()


def test_decoder_cfg_check_accepts_the_library_and_two_passes(capsys):
    decoder_checks.cfg_prediction(lambda m, x, t, c, w, null: diffusion.guided_prediction(m, x, t, c, w, null))
    decoder_checks.cfg_prediction(_cfg())
    assert capsys.readouterr().out.count("cfg_prediction: correct") == 2


@pytest.mark.parametrize("wrong, message", [
    (_cfg(lambda c, u, w: c + w * (c - u)), "(1 + w) convention"),
    (_cfg(lambda c, u, w: c - w * (c - u)), "sign is wrong"),
    (_cfg(lambda c, u, w: w * c), "unconditional prediction is missing"),
    (_cfg(lambda c, u, w: c), "returned the conditional prediction"),
    (_cfg(nulls=lambda null, conds: tuple(conds)), "keeps its value in the unconditional pass"),
    (_cfg(nulls=lambda null, conds: tuple(k for k in conds if k not in null) or tuple(conds)), "and only those"),
    (_zeros_as_null, "by zeros"),
    (_leaves_out, "do not leave it out"),
    (_in_place, "do not modify `conds`"),
])
def test_decoder_cfg_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        decoder_checks.cfg_prediction(wrong)


def test_decoder_checks_say_when_nothing_is_written():
    with pytest.raises(NotImplementedError, match="not written yet"):
        decoder_checks.cfg_prediction(_not_written)
    with pytest.raises(NotImplementedError, match="not written yet"):
        decoder_checks.corrupt_low_res(_not_written)


def _corrupt(pad="reflect", two=True, normalize=True, clamp=True, radius=None, axes="xy", per_image=True,
             noise_first=False, level_power=1.0, own_noise=False):
    """A student-style corrupt_low_res (a loop over images, separable conv), with the knobs of the usual mistakes."""
    def corrupt_low_res(low, sigma, level, noise):
        B, C, H, W = low.shape
        r = radius or max(1, math.ceil(3 * float(sigma.max())))
        x = torch.arange(-r, r + 1, dtype=torch.float32)
        eps = torch.randn_like(low) if own_noise else noise
        scaled = level.view(-1, 1, 1, 1) ** level_power * eps
        source = low + scaled if noise_first else low
        out = []
        for b in range(B):
            s = sigma[b] if per_image else sigma.max()
            s = s.clamp(min=1e-3) if clamp else s
            k = torch.exp(-x ** 2 / ((2 if two else 1) * s ** 2))
            k = k / k.sum() if normalize else k
            h = F.pad(source[b:b + 1], (r, r, r, r), mode=pad) if pad != "zeros" else F.pad(source[b:b + 1], (r,) * 4)
            h = F.conv2d(h, k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C) if "x" in axes else h[..., :, r:-r]
            h = F.conv2d(h, k.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C) if "y" in axes else h[..., r:-r, :]
            out.append(h[0])
        return torch.stack(out) + (0 if noise_first else scaled)
    return corrupt_low_res


def test_decoder_corruption_check_accepts_the_library_and_a_loop(capsys):
    decoder_checks.corrupt_low_res(lambda low, s, lv, n: upsampler.gaussian_blur(low, s) + lv.view(-1, 1, 1, 1) * n)
    decoder_checks.corrupt_low_res(_corrupt())
    assert capsys.readouterr().out.count("corrupt_low_res: correct") == 2


def _no_noise(low, sigma, level, noise):
    return upsampler.gaussian_blur(low, sigma)


def _no_blur(low, sigma, level, noise):
    return low + level.view(-1, 1, 1, 1) * noise


def _modifies_low(low, sigma, level, noise):
    low -= low.mean()                                          # in place: the caller's tensor changes
    return upsampler.gaussian_blur(low, sigma) + level.view(-1, 1, 1, 1) * noise


@pytest.mark.parametrize("wrong, message", [
    (_no_blur, "not blurred"),
    (_no_noise, "noise is missing"),
    (_corrupt(noise_first=True), "blurred the noise too"),
    (_corrupt(normalize=False), "normalise the kernel"),
    (_corrupt(two=False), "a factor 2 is missing"),
    (_corrupt(pad="zeros"), "mode='reflect'"),
    (_corrupt(pad="replicate"), "not 'replicate'"),
    (_corrupt(axes="x"), "rows only"),
    (_corrupt(level_power=2.0), "not its variance"),
    (_corrupt(own_noise=True), "use the `noise` given"),
    (_corrupt(per_image=False), "the widest blur"),
    (_corrupt(radius=3), "not a fixed 3"),
    (_corrupt(clamp=False), "sigma is 0"),
    (_modifies_low, "do not modify its inputs"),
])
def test_decoder_corruption_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        decoder_checks.corrupt_low_res(wrong)


@pytest.fixture(scope="module")
def bound_decoder():
    """A tiny CLIP and a 32-px decoder bound to it, with random weights (a trained one would do the same)."""
    torch.manual_seed(0)
    clip = clip_module.CLIP(embed_dim=16, patch_size=8, image_width=32, image_layers=1, text_width=32,
                            text_layers=1).eval()
    model = Decoder(embed_dim=16, text_width=32, resolution=32, widths=(8, 16), patch_size=2, attention_levels=(1,))
    decoder_checks.randomize_zero_layers(model.bind(clip), std=0.05)
    return model.eval(), clip


def test_decoder_cfg_decoding_check_samples_with_the_students_guidance(bound_decoder, capsys):
    model, clip = bound_decoder
    embeds = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    scored = []

    def score(images):
        scored.append(tuple(images.shape))
        return images.mean().item()

    decoder_checks.cfg_decoding(_cfg(), model, clip, embeds, score, 3.0, steps=3)
    assert scored == [(3, 3, 32, 32)] * 2                      # the student's images and the library's
    out = capsys.readouterr().out
    assert "correct" in out and "with your guidance" in out and "Decoder.decode" in out
    with pytest.raises(CheckFailed, match="make the check of the exercise above pass first"):
        decoder_checks.cfg_decoding(_cfg(lambda c, u, w: c + w * (c - u)), model, clip, embeds, score, 3.0, steps=3)
    with pytest.raises(NotImplementedError):
        decoder_checks.cfg_decoding(_not_written, model, clip, embeds, score, 3.0, steps=3)


# ============================================================================= chapter 14 (the unCLIP pipeline): checks

from minidalle2 import data as data_module, prior as prior_module, unclip  # noqa: E402
from minidalle2.course.checks import unclip as unclip_checks  # noqa: E402


def _fractions(a, s):
    s = torch.as_tensor(s, dtype=a.dtype)
    return s.view(-1, *[1] * a.ndim) if s.ndim == 1 else s


def _slerp(guard=True, clamp=True, normalise_chord=False, chord=False, swap=False, fractions_last=False):
    """A student-style slerp, with the knobs of the usual mistakes."""
    def slerp(a, b, s):
        if swap:
            a, b = b, a
        s = _fractions(a, s)
        if chord or normalise_chord:
            line = (1 - s) * a + s * b
            return F.normalize(line, dim=-1) if normalise_chord else line
        cos = (a * b).sum(-1, keepdim=True)
        omega = torch.arccos(cos.clamp(-1, 1) if clamp else cos)
        sin = torch.sin(omega)
        small = sin.abs() < 1e-6 if guard else torch.zeros_like(sin, dtype=torch.bool)
        sin = torch.where(small, torch.ones_like(sin), sin)
        out = torch.where(small, (1 - s) * a + s * b, (torch.sin((1 - s) * omega) * a + torch.sin(s * omega) * b) / sin)
        return out.transpose(0, 1) if fractions_last and out.ndim == 3 else out
    return slerp


def _slerp_scalar_only(a, b, s):                    # no reshape of a 1-D s: broadcasting fails
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1, 1))
    return (torch.sin((1 - s) * omega) * a + torch.sin(s * omega) * b) / torch.sin(omega)


def _slerp_in_place(a, b, s):
    a /= a.norm(dim=-1, keepdim=True)
    return unclip.slerp(a, b, s)


def test_unclip_slerp_check_accepts_the_library_and_a_student_version(capsys):
    unclip_checks.slerp(unclip.slerp)
    unclip_checks.slerp(_slerp())
    assert capsys.readouterr().out.count("slerp: correct") == 2


@pytest.mark.parametrize("wrong, message", [
    (_slerp(normalise_chord=True), "lerp, then normalised"),
    (_slerp(normalise_chord=True), "not equal-angle"),
    (_slerp(chord=True), "straight line (lerp)"),
    (_slerp(swap=True), "your path runs from b to a"),
    (_slerp(guard=False), "(nearly) parallel"),
    (_slerp(guard=False, clamp=False), "NaN or inf"),
    (_slerp(fractions_last=True), "the fractions' axis comes first"),
    (_slerp_scalar_only, "reshape s to (K, 1, ..., 1)"),
    (_slerp_in_place, "do not modify a, b or s in place"),
])
def test_unclip_slerp_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        unclip_checks.slerp(wrong)


def _invert_step(x0_level="s", sqrt=True, noise=True, estimate_x0=True, swap=False, own_noise=False):
    """A student-style ddim_invert_step, with the knobs of the usual mistakes."""
    def ddim_invert_step(x_s, eps, abar_s, abar_t):
        if swap:
            abar_s, abar_t = abar_t, abar_s
        if own_noise:
            eps = torch.randn_like(eps)
        root = (lambda v: v ** 0.5) if sqrt else (lambda v: v)
        level = abar_s if x0_level == "s" else abar_t
        x0 = (x_s - (1 - level) ** 0.5 * eps) / abar_s ** 0.5 if estimate_x0 else x_s
        return root(abar_t) * x0 + (root(1 - abar_t) * eps if noise else 0)
    return ddim_invert_step


def test_unclip_invert_step_check_accepts_a_student_version(capsys):
    unclip_checks.ddim_invert_step(_invert_step())
    assert "ddim_invert_step: correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (_invert_step(swap=True), "DDIM sampling step"),
    (_invert_step(x0_level="t"), "with abar_s, not abar_t"),
    (_invert_step(sqrt=False), "scale x0_hat by its square root"),
    (_invert_step(estimate_x0=False), "x_s is not the clean image"),
    (_invert_step(own_noise=True), "use the eps given"),
])
def test_unclip_invert_step_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        unclip_checks.ddim_invert_step(wrong)


def _text_diff(direction=lambda t_from, t_to: F.normalize(t_to - t_from, dim=-1), path=None, transpose=False):
    """A student-style text_diff_embeddings: a direction from the two text embeddings, then a path towards it."""
    path = path or _slerp()

    def text_diff_embeddings(z_image, t_from, t_to, thetas):
        out = path(z_image, direction(t_from, t_to), thetas)
        return out.transpose(0, 1) if transpose else out
    return text_diff_embeddings


def test_unclip_text_diff_check_accepts_the_library_and_a_student_version(capsys):
    unclip_checks.text_diff_embeddings(lambda z, a, b, th: unclip.slerp(z, unclip.text_diff_direction(a, b), th))
    unclip_checks.text_diff_embeddings(_text_diff())
    assert capsys.readouterr().out.count("text_diff_embeddings: correct") == 2


@pytest.mark.parametrize("wrong, message", [
    (_text_diff(direction=lambda a, b: b - a), "not normalised"),
    (_text_diff(direction=lambda a, b: F.normalize(a - b, dim=-1)), "the sign is wrong"),
    (_text_diff(direction=lambda a, b: F.normalize(b - a, dim=0)), "dim=-1"),
    (_text_diff(direction=lambda a, b: b), "the target caption's embedding itself"),
    (_text_diff(path=_slerp(normalise_chord=True)), "lerp, then normalised"),
    (_text_diff(path=_slerp(chord=True)), "straight line (lerp)"),
    (_text_diff(path=_slerp(swap=True)), "theta = 0 must give the image's own embedding"),
    (_text_diff(transpose=True), "you returned (B, K, D)"),
])
def test_unclip_text_diff_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        unclip_checks.text_diff_embeddings(wrong)


def test_unclip_checks_say_when_nothing_is_written():
    for check in (unclip_checks.slerp, unclip_checks.ddim_invert_step, unclip_checks.text_diff_embeddings):
        with pytest.raises(NotImplementedError, match="not written yet"):
            check(_not_written)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_clip):
    """An untrained pipeline bound to tests/conftest.py's tiny CLIP (its decoder's zero convolutions made live)."""
    torch.manual_seed(0)
    p = prior_module.DiffusionPrior(embed_dim=32, text_width=32, width=16, layers=1).bind(tiny_clip).eval()
    d = Decoder(embed_dim=32, text_width=32, widths=(16, 32), attention_levels=(1,)).bind(tiny_clip).eval()
    decoder_checks.randomize_zero_layers(d, std=0.05)
    return unclip.UnCLIP(tiny_clip, p, d)


@pytest.mark.usefixtures("one_thread")
def test_unclip_text_diff_edit_check_decodes_the_students_embeddings(tiny_pipe, capsys):
    images = data_module.render(data_module.sample_scenes(2, "test", seed=0, num_objects=1))
    sources, targets = ["a red circle", "a small blue square"], ["a blue circle", "a small green square"]
    scored = []

    def score(edited):
        scored.append(tuple(edited.shape))
        return [edited[:, k].mean().item() for k in range(edited.shape[1])]

    unclip_checks.text_diff_edit(_text_diff(), tiny_pipe, images, sources, targets, torch.tensor([0.0, 0.5]), score)
    assert scored == [(2, 2, 3, 32, 32)] * 2                     # the student's edits and the library's
    out = capsys.readouterr().out
    assert "correct" in out and "with your embeddings" in out and "pipe.text_diff" in out
    with pytest.raises(CheckFailed, match="make the check of the exercise above pass first"):
        unclip_checks.text_diff_edit(_text_diff(direction=lambda a, b: b - a), tiny_pipe, images, sources, targets,
                                     torch.tensor([0.0, 0.5]), score)
    with pytest.raises(NotImplementedError):
        unclip_checks.text_diff_edit(_not_written, tiny_pipe, images, sources, targets, torch.tensor([0.5]), score)
