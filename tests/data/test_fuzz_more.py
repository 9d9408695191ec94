"""Fuzzing the paths a config file and a checkpoint take end to end: YAML through resolve(), checkpoints
with and without their digest, any format marker. Anything but a CnnlabError is a failure."""

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from cnnlab.config import load_yaml_config, resolve
from cnnlab.errors import CnnlabError
from cnnlab.train.checkpoint import digest_path
from tests.data.test_fuzz import (
    FUZZ, checkpoint_bytes, checkpoint_loads_or_is_refused, checkpoint_values, edit_lists, fresh, mutate, yaml_mappings,
)

YAML_TOKENS = [
    "lr: ", "epochs: ", "model: ", "optim:\n  ", "augment:\n  ", "data:\n  ", "- ", "? ", ": ", "\n", "  ", "[", "]",
    "{", "}", ", ", "'", '"', "#", "&a ", "*a ", "<<: *a", "!!python/object:os.system ", "!!binary ", "!!int ", "!!float ",
    "!!str ", "!!set ", "!!omap ", "!!timestamp ", "0.1", "-3", "1e999", ".nan", "0x1F", "0o17", "12:30:00", "~", "null",
    "yes", "true", "2001-02-03", "2001-02-03T04:05:06Z", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n",
    "|\n  ", ">\n  ", "\t", "\\x00", "é", "\ufeff",
]  # fmt: skip
yaml_documents = st.one_of(
    st.text(max_size=300), yaml_mappings, st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join)
)


def config_is_resolved_or_refused(path):
    """What `cnnlab train --config` does with the file: read it, then resolve it over the defaults."""
    try:
        resolve(load_yaml_config(path), {}, origin=str(path), recipe=True)
    except CnnlabError:
        pass


@FUZZ
@given(document=yaml_documents)
def test_yaml_config_files_resolve_or_fail_clearly(tmp_path, document):
    path = tmp_path / "run.yaml"
    path.write_text(document, encoding="utf-8")
    config_is_resolved_or_refused(path)


@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.builds(mutate, st.just(b"lr: 0.1\nepochs: 3\nmodel: lenet5\n"), edit_lists)))
def test_yaml_config_files_of_any_bytes_resolve_or_fail_clearly(tmp_path, content):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    config_is_resolved_or_refused(path)


@FUZZ
@given(edits=edit_lists, sidecar=st.sampled_from(["none", "matching"]))
def test_damaged_checkpoints_without_a_true_sidecar_load_or_are_refused(tmp_path, edits, sidecar):
    path = fresh(tmp_path) / "last.pt"
    data = mutate(checkpoint_bytes(), edits)
    path.write_bytes(data)
    if sidecar == "matching":  # a writer that also rewrote the sidecar
        digest_path(path).write_text(f"{hashlib.sha256(data).hexdigest()}  last.pt\n")
    checkpoint_loads_or_is_refused(path)


@FUZZ
@given(content=st.binary(max_size=600))
def test_random_bytes_as_a_checkpoint(tmp_path, content):
    path = tmp_path / "random.pt"
    path.write_bytes(content)
    checkpoint_loads_or_is_refused(path)


@FUZZ
@given(marker=checkpoint_values)
def test_a_format_marker_of_any_value_is_refused_or_read(tmp_path, marker):
    import torch

    path = tmp_path / "marker.pt"
    torch.save({"cnnlab_checkpoint": marker}, path)
    checkpoint_loads_or_is_refused(path)
