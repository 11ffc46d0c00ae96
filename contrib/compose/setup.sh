#!/bin/sh
# The demo topology's accounts, services and rules, made once on the shared PostgreSQL before
# the relays start (RELAY_DATABASE_URL and RELAY_DOMAIN come from the environment). The billing
# token of the `immediate` vendor is written to $SHARED/cellar.token for its agent.
set -eu
relay user add alice --password alice-pw
relay service add wine --per-minute 120 --setup-fee 10 --currency EUR
relay service add bread --per-minute 60 --currency EUR
relay appserver add cellar --service wine --password cellar-pw
relay appserver add bakery --service bread --password bakery-pw
# New bread sessions go to the additional relay b.
relay redirect add --to b --service bread
relay appserver token cellar > "$SHARED/cellar.token"
echo "setup done"
