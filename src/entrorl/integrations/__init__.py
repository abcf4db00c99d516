"""entrorl inside other training frameworks (layer 4: may import everything below it).

* :mod:`entrorl.integrations.verl` — entrorl's methods as verl policy-loss modes (``entrorl_<method>``), its
  advantage estimators in verl's estimator registry, its rewards as a verl ``custom_reward_function`` and an
  actor extension that supplies entropy, S and D;
* :mod:`entrorl.integrations.trl` — :class:`EntropyGRPOTrainer`, TRL's ``GRPOTrainer`` with an entrorl objective
  and entrorl's diagnostics.

Neither framework is imported here: each submodule imports its own framework when it is imported.
"""
