"""`python -m services.domain`: run the domain service until SIGTERM."""

from services.core.runtime import main
from services.domain.app import SERVICE_NAME, build
from services.domain.settings import DomainSettings

if __name__ == "__main__":
    main(SERVICE_NAME, build, DomainSettings)
