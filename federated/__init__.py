"""gradax.federated: federated algorithms as pure functions, client simulation
over vmap and meshes, participation models, data partitioning, and a Flower
adapter (optional extra ``gradax[flower]``, imported lazily)."""

from gradax.federated.core import (ClientData, ClientOutput, FederatedAlgorithm,
                                   LocalConfig, RoundInput, ServerState,
                                   as_client_data, local_train,
                                   local_update_algorithm, make_round_input,
                                   map_clients, run_rounds, select_clients)
from gradax.federated.aggregators import (Aggregator, AggregatorInput,
                                          average_all, coordinate_median,
                                          example_weighted_mean, gaussian_dp,
                                          known_probability, participant_mean,
                                          trimmed_mean)
from gradax.federated.fedavg import fedavg
from gradax.federated.fedprox import fedprox, proximal_hook
from gradax.federated.fedau import (FedAUState, fedau, fedau_aggregator,
                                    fedau_weights)
from gradax.federated.fedopt import (fedadagrad, fedadam, fedavgm, fedopt,
                                     fedyogi)
from gradax.federated.scaffold import ScaffoldState, scaffold
from gradax.federated.fedcm import fedcm
from gradax.federated.pfedme import pfedme
from gradax.federated.masked import masked_fedavg, masked_mean
from gradax.federated.decentralized import (DecentralizedState, dfedavg,
                                            dfedsam, decentralized,
                                            mixing_matrix)
from gradax.federated.asynchronous import (fedbuff, tiered_speeds, SpeedModel,
                                           staleness_weight)
from gradax.federated.favano import favano
from gradax.federated.fedast import AstTask, fedast
from gradax.federated.fedcompass import fedcompass
from gradax.federated.fedhyper import (client_hypergradient_sgd, fedhyper,
                                       scale_by_hypergradient)
from gradax.federated.fedspeed import fedspeed
from gradax.federated.fedamd import fedamd
from gradax.federated import participation
from gradax.federated import data
from gradax.federated import models
