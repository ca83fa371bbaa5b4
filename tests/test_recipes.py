"""docs/recipes.md's tables are the packaged recipes' values: every row holds in its recipes, and every
setting a recipe writes has a row (the recipes and the flag-by-flag tables of the original scripts cannot drift)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from biomedgpt.core.config import PACKAGE_ROOT, load, to_dict
from biomedgpt.engine.run_config import RunConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
BASE_HEADER = "| original flag | setting | value |"
DERIVED_HEADER = "| original | recipe | setting | value |"
# what a recipe writes that no table row needs: where the data lives, the run's own files and logging
UNTABLED = {"data.streams", "data.eval_streams", "data.group_weights", "data.cache_dir", "data.num_workers",
            "checkpoint", "log", "output_dir", "seed"}


def _cells(line: str) -> list[str]:
    return [cell.strip().strip("`").strip() for cell in line.strip().strip("|").split("|")]


def _table(lines: list[str], header: str) -> list[list[str]]:
    if header not in lines:
        return []
    rows = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    return rows


def expected_values() -> dict[str, dict[str, str]]:
    """recipe name -> {setting: value as written}, from the per-script tables and the derived recipes' table."""
    sections: dict[str, tuple[list[str], dict[str, str]]] = {}
    derived_rows: list[list[str]] = []
    for chunk in DOC.read_text().split("\n## ")[1:]:
        lines = chunk.splitlines()
        title = lines[0].split(":")[0].strip()
        recipes = next((re.findall(r"`([^`]+)`", line) for line in lines if line.startswith("Recipes:")), [])
        rows = _table(lines, BASE_HEADER)
        if rows:
            settings = [row[1] for row in rows]
            assert len(set(settings)) == len(settings), f"{title}: a setting has two rows"
            sections[title] = (recipes, {row[1]: row[2] for row in rows})
        derived_rows += _table(lines, DERIVED_HEADER)
    expected = {recipe: dict(values) for recipes, values in sections.values() for recipe in recipes}
    for original, recipe_cell, setting, value in derived_rows:
        assert original in sections, f"derived recipes name an unknown original {original!r}"
        for recipe in (r.strip().strip("`") for r in recipe_cell.split(",")):
            recipe = recipe if "/" in recipe else f"finetune/{recipe}"
            expected.setdefault(recipe, dict(sections[original][1]))
            if setting:
                # lora.*: no original fine-tunes with LoRA (finetune/vqa_rad_lora adds its settings)
                assert setting in expected[recipe] or setting.startswith("lora."), \
                    f"{recipe}: {setting} overrides no row of {original}"
                expected[recipe][setting] = value
    return expected


EXPECTED = expected_values()


def _walk(tree, dotted: str):
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        tree = tree[int(part[1:-1])] if part.startswith("[") else tree[part]
    return tree


def actual_value(cfg: RunConfig, setting: str):
    """A table's setting resolved in a loaded recipe (see the key to docs/recipes.md)."""
    split, _, rest = setting.rpartition(":")
    if split:
        task, _, key = rest.partition(".")
        downstream = cfg.eval.downstream.validation() if split == "valid" else cfg.eval.downstream
        return _walk(to_dict(downstream.task(task)), key)
    if setting.startswith("model.") and setting != "model.size":
        return _walk(to_dict(cfg.model.build()), setting[len("model."):])
    return _walk(to_dict(cfg), setting)


def _same(actual, written: str, name: str) -> bool:
    want = yaml.safe_load(written.replace("{name}", name))
    if isinstance(want, str) and isinstance(actual, str) and "/" in want:
        return actual == want or Path(actual) == Path.cwd() / want  # packaged recipes resolve against the cwd
    if isinstance(want, float) or isinstance(actual, float):
        return actual == pytest.approx(want, rel=1e-12)
    if isinstance(want, list):
        return isinstance(actual, (list, tuple)) and list(actual) == pytest.approx(want, rel=1e-12)
    return actual == want


def _written_settings(raw: dict) -> set[str]:
    """The settings a recipe file writes, as table keys (downstream tasks as test: / valid: rows)."""
    out: set[str] = set()

    def leaves(tree, prefix):
        if isinstance(tree, dict) and tree:
            for key, value in tree.items():
                yield from leaves(value, f"{prefix}.{key}" if prefix else key)
        else:
            yield prefix

    for key in leaves({k: v for k, v in raw.items()}, ""):
        if any(key == u or key.startswith(u + ".") for u in UNTABLED):
            continue
        for section, split in (("eval.downstream.tasks.", "test"), ("eval.downstream.valid_tasks.", "valid")):
            if key.startswith(section):
                key = f"{split}:{key[len(section):]}"
        out.add(key)
    return out


def test_the_doc_covers_every_recipe_of_an_original_script():
    packaged = {p.relative_to(PACKAGE_ROOT / "configs").with_suffix("").as_posix()
                for p in (PACKAGE_ROOT / "configs" / "finetune").glob("*.yaml")}
    assert packaged - set(EXPECTED) == {"finetune/instruction"}  # the project's own recipe, no original
    assert {"finetune/vqa_rad", "finetune/peir_gross", "finetune/mednli", "finetune/meqsum",
            "finetune/medmnist_blood", "pretrain_tiny"} <= set(EXPECTED)


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_equals_its_table(recipe):
    cfg = load(RunConfig, recipe)
    name = cfg.data.streams[0].name
    wrong = {setting: (actual_value(cfg, setting), written) for setting, written in EXPECTED[recipe].items()
             if not _same(actual_value(cfg, setting), written, name)}
    assert not wrong, f"{recipe} differs from docs/recipes.md (setting: (recipe, table)): {wrong}"
    raw = yaml.safe_load((PACKAGE_ROOT / "configs" / f"{recipe}.yaml").read_text())
    untabled = _written_settings(raw) - set(EXPECTED[recipe])
    assert not untabled, f"{recipe} writes settings docs/recipes.md has no row for: {sorted(untabled)}"


def test_a_changed_recipe_value_is_caught():
    """The comparison itself: a value off from the table fails it."""
    cfg = load(RunConfig, "finetune/vqa_rad", ["optim.max_epochs=200", "eval.downstream.tasks.vqa.generation.beam_size=5"])
    assert not _same(actual_value(cfg, "optim.max_epochs"), EXPECTED["finetune/vqa_rad"]["optim.max_epochs"], "vqa_rad")
    assert not _same(actual_value(cfg, "test:vqa.generation.beam_size"),
                     EXPECTED["finetune/vqa_rad"]["test:vqa.generation.beam_size"], "vqa_rad")


def test_fp16_loss_scaling_reaches_deepspeed():
    """The scripts' --fp16-init-scale / --fp16-scale-window (and fairseq's halving on the first overflow)
    replace the DeepSpeed template's values."""
    from biomedgpt.engine.distributed.ds_config import build_ds_config

    fp16 = build_ds_config(load(RunConfig, "finetune/mednli"))["fp16"]
    assert (fp16["initial_scale_power"], fp16["loss_scale_window"], fp16["hysteresis"]) == (4, 512, 1)
    template = build_ds_config(load(RunConfig, "finetune/mednli", ["deepspeed.initial_scale_power=null",
                                                                    "deepspeed.loss_scale_window=null",
                                                                    "deepspeed.loss_scale_hysteresis=null"]))["fp16"]
    assert (template["initial_scale_power"], template["loss_scale_window"], template["hysteresis"]) == (16, 1000, 2)
