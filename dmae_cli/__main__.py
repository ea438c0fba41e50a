from dmae_cli.cli.app import main

main()
