from dmae_cli.cli import main

main()
