"""erpo-kernels: fused ERPO / EP-GRPO / GRPO / DAPO / Dr.GRPO losses from hidden states.

    from erpo_kernels import erpo_loss, ERPOConfig, ERPOLoss, token_stats, erpo_advantages

Importing the package never imports Triton or the native extension; backends load on first use.
"""
from erpo_kernels.advantages import Advantages, erpo_advantages
from erpo_kernels.config import ERPOConfig
from erpo_kernels.loss import ERPOLoss, ERPOOutput, erpo_loss
from erpo_kernels.stats import TokenStats, token_stats

__version__ = "0.1.0"
__all__ = ["erpo_loss", "ERPOConfig", "ERPOLoss", "ERPOOutput", "token_stats", "TokenStats",
           "erpo_advantages", "Advantages", "__version__"]
