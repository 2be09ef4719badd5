"""Suite-wide settings: strict numerics, and small shared fixtures."""

import jax
import pytest

# Fail on implicit rank promotion: a [batch] vs [batch, 1] broadcast is a classic embedding bug.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def bundled():
    """The bundled ml-latest-small dataset, split as the notebook (seed 42, 20% validation)."""
    from jaxcf import config, data

    return data.load(config.DataConfig(), seed=42)

# The longest tests (6 s or more each in `python -m pytest -q -n 2 --durations=40` on the 2-core
# development CPU): marked `slow`, so that `-m "not slow"` is a quick check while developing. CI runs
# every test.
LONGEST = {
    "tests/test_parity.py::test_f_jaxcf_trained_weights_in_torch",
    "tests/test_parity.py::test_e_five_epochs_of_the_notebook_configs",
    "tests/test_bfm.py::test_blocks_hold_the_groups_asked_for_and_sets_of_the_chosen_pairs",
    "tests/test_bfm.py::test_posterior_mean_matches_myfm_on_a_small_case",
    "tests/test_bfm_sampler.py::test_posterior_matches_dense_reference",
    "tests/test_bfm_sampler.py::test_sweep_replays_dense_gibbs_with_the_same_draws",
    "tests/test_distributed.py::test_every_family_trains_on_the_mesh_as_on_one_device",
    "tests/test_distributed.py::test_sharded_training_matches_one_device",
    "tests/test_distributed.py::test_two_processes_match_one_process_and_resume_on_one_device",
    "tests/test_docs.py::test_code_blocks_run_as_written",
    "tests/test_ensemble.py::test_gibbs_ensemble_learns_a_low_rank_table",
    "tests/test_foldin.py::test_ensembles_and_gibbs_exports_fold_in_per_member",
    "tests/test_foldin.py::test_strong_generalisation_on_a_small_case",
    "tests/test_implicit.py::test_conjugate_gradient_converges_to_the_exact_solve",
    "tests/test_implicit.py::test_each_model_trains_resumes_exports_loads_recommends_and_folds_in",
    "tests/test_interrupt.py::test_a_second_process_on_a_busy_workdir_is_refused",
    "tests/test_interrupt.py::test_a_stop_signal_checkpoints_exits_and_resumes_bitwise",
    "tests/test_interrupt.py::test_sigkill_leaves_only_complete_checkpoints_and_resume_is_bitwise",
    "tests/test_linalg.py::test_the_gibbs_sampler_finishes_every_time",
    "tests/test_lowering.py::test_no_lapack_kernel_on_cpu",
    "tests/test_parity.py::test_d64_float64_steps_are_the_same_arithmetic",
    "tests/test_parity.py::test_d_one_epoch_trajectory",
    "tests/test_probe.py::test_a_full_disk_at_checkpoint_time_is_one_line",
    "tests/test_resume.py::test_each_family_stops_after_two_epochs_and_resumes_bitwise",
    "tests/test_robustness.py::test_a_stall_in_jaxcf_fit_raises_and_never_ends_the_caller",
    "tests/test_robustness.py::test_a_stalled_epoch_dumps_every_stack_and_exits_3",
    "tests/test_robustness.py::test_the_progress_bar_keeps_out_of_logs_and_is_labelled_by_family",
    "tests/test_rows.py::test_fast_sweep_draws_what_the_gibbs_sweep_draws",
    "tests/test_serve.py::test_warm_up_compiles_what_the_first_requests_use",
    "tests/test_train.py::test_notebook_configs_land_in_the_notebook_band",
    "tests/test_train.py::test_resume_in_a_new_process_is_bitwise_equal_to_an_uninterrupted_run",
}


# Whole files of end-to-end runs in subprocesses (signals, meshes of 8 devices, resumes).
LONGEST_FILES = {"tests/test_interrupt.py", "tests/test_distributed.py", "tests/test_resume.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[")[0] in LONGEST or item.nodeid.split("::")[0] in LONGEST_FILES:
            item.add_marker(pytest.mark.slow)
