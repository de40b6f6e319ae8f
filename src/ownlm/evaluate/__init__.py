"""Evaluate: does a personal model beat its base, and may it be deployed?

metrics (held-out NLL, drift, persona probes; pure functions) · general (general-ability benchmarks) · report (the
JSON/plot report) · run (`ownlm eval` on an installed model) · gate (the quality gate a round must pass) ·
personas/ (the fictional users of tests, demo and benchmarks).
"""
