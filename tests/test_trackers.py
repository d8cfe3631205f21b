"""`--report_to`: which tracker reaches `Accelerator(log_with=...)`."""

import logging

from fit3d_hf.trackers import available_tracker


def test_no_tracker_all_trackers_and_installed_ones_pass_through():
    assert [available_tracker(value) for value in ("none", "", None)] == [None, None, None]
    assert available_tracker("all") == "all"  # accelerate picks every installed tracker (not a package "all")
    assert available_tracker("tensorboard") == "tensorboard"  # installed by the test extra


def test_a_missing_tracker_package_warns_with_the_install_command_and_logs_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="fit3d_hf.trackers"):
        assert available_tracker("no_such_tracker_pkg") is None
    assert "pip install no_such_tracker_pkg" in caplog.text
