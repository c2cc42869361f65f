"""Shape checks shared by the batch-statistic losses."""

from histokd.errors import ConfigError


def check_pair(za, zb, name):
    sa, sb = tuple(za.shape), tuple(zb.shape)
    if len(sa) != 2 or len(sb) != 2:
        raise ConfigError(f"{name} expects embeddings of shape [batch, dim]; got {sa} and {sb}")
    if sa[1] is not None and sb[1] is not None and sa[1] != sb[1]:
        raise ConfigError(f"{name}: the two branches' embeddings differ in width ({sa[1]} vs {sb[1]}); "
                          "give both expanders the same output width")
    if sa[0] is not None and sb[0] is not None and sa[0] != sb[0]:
        raise ConfigError(f"{name}: the two views have different batch sizes ({sa[0]} vs {sb[0]})")
    if sa[0] is not None and sa[0] < 2:
        raise ConfigError(f"{name} needs a batch of at least 2 (it uses batch statistics); got {sa[0]}. "
                          "Increase train.batch_size.")
