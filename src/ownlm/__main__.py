from ownlm.cli import main

main()
