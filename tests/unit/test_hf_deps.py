"""A missing optional dependency of the Hugging Face doors names the extra that provides it."""

import pytest

from mod_train.hf.deps import MissingExtraError, require


def test_missing_module_names_the_hf_extra():
    with pytest.raises(MissingExtraError, match=r"no_such_module_xyz not installed: pip install -e '\.\[hf\]'"):
        require("json", "no_such_module_xyz")
    require("json")  # present: no error
