"""The two models (reward model, generator), their vocabularies, legal masks, numpy tables
and the one checkpoint format that saves and loads both."""
