"""The private TRL/transformers methods stack_dpo/compat.py wraps: with the pinned versions they
are there, take the arguments relied on and are called where relied on; a change fails loudly."""

import inspect

import pytest
from transformers import Trainer
from trl import DPOTrainer

from stack_dpo import compat


def test_the_private_methods_relied_on_have_the_arguments_relied_on():
    compat.check_private_api()


def test_trl_computes_reference_log_probs_through_the_overridden_hook():
    # the override is only worth something if TRL's training path calls the hook for both splits
    source = inspect.getsource(DPOTrainer)
    assert "self.train_dataset = self._precompute_ref_logps(" in source
    assert "self._precompute_ref_logps(eval_dataset" in source or "self.eval_dataset = self._precompute_ref_logps(" \
        in source
    assert "self._load_from_checkpoint(" in inspect.getsource(Trainer)


@pytest.mark.parametrize("owner, name", [(DPOTrainer, "_precompute_ref_logps"), (Trainer, "_load_from_checkpoint")])
def test_a_private_method_with_other_arguments_fails_at_import_naming_it(monkeypatch, owner, name):
    monkeypatch.setattr(owner, name, lambda self, changed: None)
    with pytest.raises(ImportError, match=rf"{owner.__name__}\.{name} is now \['self', 'changed'\]"):
        compat.check_private_api()


def test_a_private_method_that_is_gone_fails_at_import_naming_it(monkeypatch):
    monkeypatch.setattr(compat, "RELIED_ON", {(DPOTrainer, "_renamed_in_a_future_trl"): ["self"]})
    with pytest.raises(ImportError, match=r"DPOTrainer\._renamed_in_a_future_trl is gone .*trl 1\.16"):
        compat.check_private_api()
