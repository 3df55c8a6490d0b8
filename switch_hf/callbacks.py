"""`Trainer` callbacks for Switch models."""

from transformers import TrainerCallback


class RouterBiasUpdateCallback(TrainerCallback):
    """Moves the routers' expert biases after every optimizer step (auxiliary-loss-free load balancing, see
    `SwitchConfig.router_bias_update_rate`): `Trainer(..., callbacks=[RouterBiasUpdateCallback()])`."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # `Trainer` may hand over the model wrapped (DDP, compiled): the Switch model is its innermost module.
        while hasattr(model, "module") and not hasattr(model, "update_router_biases"):
            model = model.module
        model.update_router_biases()
