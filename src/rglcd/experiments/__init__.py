"""Orchestrations above training and evaluation, one module each: in the miniature world, the quick start
(:mod:`.quickstart`, ``rglcd quickstart``), the over-optimisation experiment (:mod:`.overoptimisation`, ``rglcd world
overoptimisation``) and the sampler-reward experiment (:mod:`.sampler_reward`, ``rglcd world sampler-reward``); and
the seconds-long demo on tiny random models (:mod:`.demo`, ``rglcd demo``)."""
