"""Schedules (tcsm_kernels.schedules): ELBO time weights checked in float64."""
import pytest
import torch

from tcsm_kernels.schedules import (CosineSchedule, LinearSchedule, LogLinearSchedule,
                                    PolynomialSchedule, Schedule, from_mdlm_time)

MDLM_TIMES = [1e-7, 1e-5, 1e-3, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("eps", [1e-3, 0.0, 0.3])
@pytest.mark.parametrize("t_prime", MDLM_TIMES)
def test_loglinear_weight_at_mdlm_time_keeps_float32_precision(t_prime, eps):
    """The weight is 1 / t' for every eps; float32 within 1e-6 of it down to t' = 1e-7, where
    time_weight(1 - t') has lost t''s digits to the rounding of 1 - t' (0.16 at 1e-7)."""
    ours = LogLinearSchedule(eps).mdlm_time_weight(torch.tensor([t_prime]))
    assert ours.dtype == torch.float32
    assert abs(float(ours.double()) * t_prime - 1) < 1e-6
    exact = LogLinearSchedule(eps).mdlm_time_weight(torch.tensor([t_prime], dtype=torch.float64))
    assert abs(float(exact) * t_prime - 1) < 1e-12


@pytest.mark.parametrize("t_prime", [1e-7, 1e-5])
def test_time_weight_of_one_minus_t_prime_is_what_mdlm_time_avoids(t_prime):
    rounded = LogLinearSchedule().time_weight(1 - torch.tensor([t_prime]))
    assert abs(float(rounded.double()) * t_prime - 1) > 1e-3


def test_loglinear_time_weight_is_precise_near_one():
    """Float32 times just below 1 (exact values): 1 / (1 - t) to float32 rounding, where the
    generic dkappa / (1 - kappa) cancels (relative error 1e-3 at 1 - t = 2**-20)."""
    t = torch.tensor([1 - 2.0**-20, 1 - 2.0**-14, 0.9999, 0.5, 0.3, 0.0])
    exact = 1 / (1 - t.double())
    ours = LogLinearSchedule().time_weight(t)
    assert ours.dtype == torch.float32
    assert ((ours.double() / exact - 1).abs() < 1e-6).all()
    generic = Schedule.time_weight(LogLinearSchedule(), t)
    assert float((generic.double() / exact - 1).abs().max()) > 1e-4


def test_loglinear_time_weight_equals_the_generic_form_in_float64():
    t = torch.linspace(0, 0.999, 101, dtype=torch.float64)
    for eps in (1e-3, 0.0, 0.3):
        schedule = LogLinearSchedule(eps)
        torch.testing.assert_close(schedule.time_weight(t), Schedule.time_weight(schedule, t),
                                   rtol=1e-12, atol=0)


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule(), PolynomialSchedule(3.0)],
                         ids=repr)
def test_default_weight_at_mdlm_time_is_the_weight_at_one_minus_t(schedule):
    t_prime = torch.tensor(MDLM_TIMES, dtype=torch.float64)
    torch.testing.assert_close(schedule.mdlm_time_weight(t_prime),
                               schedule.time_weight(from_mdlm_time(t_prime)), rtol=0, atol=0)


def test_loglinear_eps_out_of_range():
    with pytest.raises(ValueError, match="eps"):
        LogLinearSchedule(1.0)
